// One registration function per kernel family; module.cpp calls them all.
#pragma once

#include <pybind11/pybind11.h>

namespace imgtx {
namespace bindings {

void register_info(pybind11::module_& m);
void register_codebook(pybind11::module_& m);
void register_diffusion(pybind11::module_& m);
void register_attention(pybind11::module_& m);

}  // namespace bindings
}  // namespace imgtx
