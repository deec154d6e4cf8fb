// imgtx_fast._C: ints and floats in, results or a C++ exception out. No logic lives here;
// pybind11 maps std::invalid_argument to ValueError and std::runtime_error to RuntimeError.
#include "bindings/bindings.h"
#include "bindings/torch_state.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "imgtx_fast compiled core (framework-free: pointers, sizes, strides, streams)";
  imgtx::bindings::register_info(m);
  imgtx::bindings::register_codebook(m);
  imgtx::bindings::register_diffusion(m);
  imgtx::bindings::register_attention(m);
  imgtx::bindings::register_attention_eager(m);
  imgtx::bindings::register_torch_state(m);
}
