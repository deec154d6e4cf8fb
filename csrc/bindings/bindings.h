// One registration function per kernel family; module.cpp calls them all.
#pragma once

#include <cstdint>

#include <pybind11/pybind11.h>

namespace imgtx {
namespace bindings {

// The causal_offset meaning "not causal" (Python: _C.ATTN_NO_CAUSAL).
constexpr int64_t kAttnNoCausal = -(int64_t(1) << 62);

void register_info(pybind11::module_& m);
void register_codebook(pybind11::module_& m);
void register_diffusion(pybind11::module_& m);
void register_attention(pybind11::module_& m);
// _C only: the CPU forward's one-call entry point (attention_eager.cpp).
void register_attention_eager(pybind11::module_& m);

}  // namespace bindings
}  // namespace imgtx
