// What the one-call entry points ask torch before they run a kernel on a call's tensors, and the
// two torch functions they call (_C only).
//
// Why in C: right after a model's torch ops the interpreter's caches are cold, and each Python
// frame, global lookup and call of the per-call checks cost microseconds there (a (8, 8, 64, 64)
// attention call paid ~30 us of Python around its kernel, ~9 us warm). The checks call the
// same torch functions as before, from C.
//
// No torch headers and no libtorch: imgtx_fast/ops/_launch.py hands over the torch objects once
// (set_torch_hooks), and they are called through the Python C API. Until then, or when a torch
// release lacks one of the private functions, every call takes the registered op.
#pragma once

#include <Python.h>

#include <cstdint>

#include <pybind11/pybind11.h>

namespace imgtx {
namespace bindings {

// Whether a call may run its op's implementation instead of the registered custom op: every
// tensor a plain CPU torch.Tensor (None allowed), no JIT tracing, functorch transform or
// torch_dispatch mode, and (unless the caller records autograd itself) no input requiring grad
// while grad mode is on. 1 yes, 0 no, -1 with a Python error set.
int eager_tensors_ok(PyObject* const* tensors, Py_ssize_t n, bool autograd);

// Whether attention's one-call path may run: every thread on the fast backend, no emulator
// context (imgtx_fast.testing.emulated_cuda) in this one, autocast off. 1, 0 or -1.
int eager_kernels_ok();

// The DType code (0 float32, 1 float16, 2 bfloat16) of a torch dtype object, -1 for others.
int float_dtype_code(PyObject* dtype);
bool is_bool_dtype(PyObject* dtype);
bool is_int64_dtype(PyObject* dtype);

// torch.empty_strided(size, stride, dtype=dtype): a new reference, or NULL with an error set.
PyObject* new_torch_tensor(const int64_t* size, const int64_t* stride, int ndim, PyObject* dtype);
// The float32 dtype object (for lse), borrowed.
PyObject* float32_dtype();

// max(1, torch.get_num_threads()), or -1 with an error set.
int torch_num_threads();

// set_torch_hooks, eager_fast_path and set_fast_everywhere in _C.
void register_torch_state(pybind11::module_& m);

}  // namespace bindings
}  // namespace imgtx
