// One registration function per kernel family; module.cpp calls them all.
#pragma once

#include <pybind11/pybind11.h>

namespace imgtx {
namespace bindings {

void register_info(pybind11::module_& m);
void register_codebook(pybind11::module_& m);
void register_diffusion(pybind11::module_& m);
void register_attention(pybind11::module_& m);
// _C only: the CPU forward's one-call entry point (attention_eager.cpp).
void register_attention_eager(pybind11::module_& m);

}  // namespace bindings
}  // namespace imgtx
