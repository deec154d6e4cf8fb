// The torch state checks of the one-call entry points (torch_state.h).
#include "bindings/torch_state.h"

namespace imgtx {
namespace bindings {

namespace {

// The torch objects, owned (strong references for the life of the process). Set and read with
// the GIL held, like every Python object.
struct TorchHooks {
  PyObject* tensor_type = nullptr;      // torch.Tensor: exact type only (subclasses dispatch)
  PyObject* is_tracing = nullptr;       // torch._C._is_tracing
  PyObject* peek_interpreter = nullptr; // torch._C._functorch.peek_interpreter_stack
  PyObject* dispatch_len = nullptr;     // torch._C._len_torch_dispatch_stack
  PyObject* grad_enabled = nullptr;     // torch.is_grad_enabled
  PyObject* any_autocast = nullptr;     // torch._C._is_any_autocast_enabled
  PyObject* emulator = nullptr;         // imgtx_fast.ops._launch.EMULATOR (a ContextVar)
  PyObject* num_threads = nullptr;      // torch.get_num_threads
  PyObject* empty_strided = nullptr;    // torch.empty_strided
  PyObject* dtypes[3] = {nullptr, nullptr, nullptr};  // float32, float16, bfloat16
  PyObject* bool_dtype = nullptr;
  PyObject* int64_dtype = nullptr;
  PyObject* dtype_kwname = nullptr;     // ("dtype",)
  bool complete = false;                // every hook present: the fast paths may run
};

TorchHooks g_hooks;
PyObject* g_is_cpu = nullptr;  // interned attribute names
PyObject* g_requires_grad = nullptr;

// No backend("reference") block open in any thread and 'fast' the default (imgtx_fast._backend
// publishes every change; the GIL orders writes and reads).
bool g_fast_everywhere = true;

// 1 when f() is truthy, 0 when not, -1 on error.
int call_truthy(PyObject* f) {
  PyObject* r = PyObject_CallNoArgs(f);
  if (!r) return -1;
  const int t = PyObject_IsTrue(r);
  Py_DECREF(r);
  return t;
}

// 1 when t.<name> is truthy, 0 when not, -1 on error.
int attr_truthy(PyObject* t, PyObject* name) {
  PyObject* r = PyObject_GetAttr(t, name);
  if (!r) return -1;
  const int t_ = PyObject_IsTrue(r);
  Py_DECREF(r);
  return t_;
}

void set_hook(PyObject*& slot, PyObject* value) {
  PyObject* old = slot;
  slot = value == Py_None ? nullptr : value;
  Py_XINCREF(slot);
  Py_XDECREF(old);
}

// set_torch_hooks(tensor_type, is_tracing, peek_interpreter_stack, dispatch_stack_len,
//                 is_grad_enabled, any_autocast_enabled, emulator_var, get_num_threads,
//                 empty_strided, (float32, float16, bfloat16), bool, int64) -> None
// A private function missing from the running torch is passed as None: the fast paths then
// stay off.
PyObject* set_torch_hooks(PyObject*, PyObject* const* a, Py_ssize_t n) {
  if (n != 12) {
    PyErr_Format(PyExc_TypeError, "set_torch_hooks takes 12 arguments, got %zd", n);
    return nullptr;
  }
  if (!PyType_Check(a[0]) || !PyContextVar_CheckExact(a[6]) || !PyTuple_Check(a[9]) ||
      PyTuple_GET_SIZE(a[9]) != 3) {
    PyErr_SetString(PyExc_TypeError, "set_torch_hooks: expected torch.Tensor, a ContextVar and "
                                     "a tuple of the three float dtypes");
    return nullptr;
  }
  TorchHooks& h = g_hooks;
  PyObject** slots[9] = {&h.tensor_type,  &h.is_tracing, &h.peek_interpreter,
                         &h.dispatch_len, &h.grad_enabled, &h.any_autocast,
                         &h.emulator,     &h.num_threads, &h.empty_strided};
  bool complete = true;
  for (int i = 0; i < 9; ++i) {
    set_hook(*slots[i], a[i]);
    complete = complete && *slots[i] != nullptr;
  }
  for (int i = 0; i < 3; ++i) set_hook(h.dtypes[i], PyTuple_GET_ITEM(a[9], i));
  set_hook(h.bool_dtype, a[10]);
  set_hook(h.int64_dtype, a[11]);
  if (!h.dtype_kwname) {
    h.dtype_kwname = Py_BuildValue("(s)", "dtype");
    if (!h.dtype_kwname) return nullptr;
  }
  h.complete = complete;
  Py_RETURN_NONE;
}

// eager_fast_path(autograd, *tensors) -> bool: eager_tensors_ok for Python callers.
PyObject* eager_fast_path(PyObject*, PyObject* const* a, Py_ssize_t n) {
  if (n < 1) {
    PyErr_SetString(PyExc_TypeError, "eager_fast_path(autograd, *tensors)");
    return nullptr;
  }
  const int autograd = PyObject_IsTrue(a[0]);
  if (autograd < 0) return nullptr;
  const int ok = eager_tensors_ok(a + 1, n - 1, autograd != 0);
  if (ok < 0) return nullptr;
  return PyBool_FromLong(ok);
}

PyObject* set_fast_everywhere(PyObject*, PyObject* flag) {
  const int t = PyObject_IsTrue(flag);
  if (t < 0) return nullptr;
  g_fast_everywhere = t != 0;
  Py_RETURN_NONE;
}

PyMethodDef g_defs[] = {
    {"set_torch_hooks", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&set_torch_hooks)),
     METH_FASTCALL,
     "set_torch_hooks(tensor_type, is_tracing, peek_interpreter_stack, dispatch_stack_len, "
     "is_grad_enabled, any_autocast_enabled, emulator_var, get_num_threads, empty_strided, "
     "float_dtypes, bool_dtype, int64_dtype): the torch objects the one-call entry points check "
     "and call (None for a private function this torch lacks: the fast paths stay off)."},
    {"eager_fast_path", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&eager_fast_path)),
     METH_FASTCALL,
     "eager_fast_path(autograd, *tensors) -> bool: plain CPU tensors (None allowed), no tracing, "
     "functorch transform or dispatch mode, and unless autograd, no input requiring grad under "
     "grad mode."},
    {"set_fast_everywhere", &set_fast_everywhere, METH_O,
     "set_fast_everywhere(flag): whether every thread is on the fast backend "
     "(imgtx_fast._backend keeps it current)."},
};

}  // namespace

int eager_tensors_ok(PyObject* const* tensors, Py_ssize_t n, bool autograd) {
  const TorchHooks& h = g_hooks;
  if (!h.complete) return 0;
  int t = call_truthy(h.is_tracing);
  if (t != 0) return t < 0 ? -1 : 0;
  PyObject* top = PyObject_CallNoArgs(h.peek_interpreter);
  if (!top) return -1;
  const bool transformed = top != Py_None;
  Py_DECREF(top);
  if (transformed) return 0;
  t = call_truthy(h.dispatch_len);  // a length: nonzero when a mode is active
  if (t != 0) return t < 0 ? -1 : 0;
  // An input requiring grad matters only in grad mode (autograd then records the call), and
  // not at all to a caller that records autograd itself: grad mode is asked first, so inference
  // under no_grad reads no requires_grad flag (each attribute read costs 1-3 us right after a
  // model's torch ops, when the caches are cold).
  bool check_grad = false;
  if (!autograd) {
    t = call_truthy(h.grad_enabled);
    if (t < 0) return -1;
    check_grad = t != 0;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* x = tensors[i];
    if (x == Py_None) continue;
    if (reinterpret_cast<PyObject*>(Py_TYPE(x)) != h.tensor_type) return 0;
    t = attr_truthy(x, g_is_cpu);
    if (t <= 0) return t;
    if (check_grad) {
      t = attr_truthy(x, g_requires_grad);
      if (t != 0) return t < 0 ? -1 : 0;
    }
  }
  return 1;
}

int eager_kernels_ok() {
  const TorchHooks& h = g_hooks;
  if (!h.complete || !g_fast_everywhere) return 0;
  PyObject* module = nullptr;
  if (PyContextVar_Get(h.emulator, Py_None, &module) < 0) return -1;
  const bool emulated = module != Py_None;
  Py_DECREF(module);
  if (emulated) return 0;
  const int t = call_truthy(h.any_autocast);
  return t < 0 ? -1 : !t;
}

int float_dtype_code(PyObject* dtype) {
  for (int i = 0; i < 3; ++i)
    if (dtype == g_hooks.dtypes[i] && dtype) return i;  // torch dtypes are singletons
  return -1;
}

bool is_bool_dtype(PyObject* dtype) { return dtype && dtype == g_hooks.bool_dtype; }
bool is_int64_dtype(PyObject* dtype) { return dtype && dtype == g_hooks.int64_dtype; }
PyObject* float32_dtype() { return g_hooks.dtypes[0]; }

PyObject* new_torch_tensor(const int64_t* size, const int64_t* stride, int ndim, PyObject* dtype) {
  if (!g_hooks.empty_strided) {
    PyErr_SetString(PyExc_RuntimeError, "imgtx_fast: torch hooks are not set");
    return nullptr;
  }
  PyObject* sizes = PyTuple_New(ndim);
  PyObject* strides = PyTuple_New(ndim);
  if (!sizes || !strides) {
    Py_XDECREF(sizes);
    Py_XDECREF(strides);
    return nullptr;
  }
  for (int i = 0; i < ndim; ++i) {
    PyObject* s = PyLong_FromLongLong(size[i]);
    PyObject* st = PyLong_FromLongLong(stride[i]);
    if (!s || !st) {
      Py_XDECREF(s);
      Py_XDECREF(st);
      Py_DECREF(sizes);
      Py_DECREF(strides);
      return nullptr;
    }
    PyTuple_SET_ITEM(sizes, i, s);
    PyTuple_SET_ITEM(strides, i, st);
  }
  PyObject* args[3] = {sizes, strides, dtype};
  PyObject* t = PyObject_Vectorcall(g_hooks.empty_strided, args, 2, g_hooks.dtype_kwname);
  Py_DECREF(sizes);
  Py_DECREF(strides);
  return t;
}

int torch_num_threads() {
  if (!g_hooks.num_threads) {
    PyErr_SetString(PyExc_RuntimeError, "imgtx_fast: torch hooks are not set");
    return -1;
  }
  PyObject* r = PyObject_CallNoArgs(g_hooks.num_threads);
  if (!r) return -1;
  const long n = PyLong_AsLong(r);
  Py_DECREF(r);
  if (n == -1 && PyErr_Occurred()) return -1;
  return n < 1 ? 1 : int(n);
}

void register_torch_state(pybind11::module_& m) {
  g_is_cpu = PyUnicode_InternFromString("is_cpu");
  g_requires_grad = PyUnicode_InternFromString("requires_grad");
  if (!g_is_cpu || !g_requires_grad) throw pybind11::error_already_set();
  for (PyMethodDef& def : g_defs) {
    PyObject* fn = PyCFunction_NewEx(&def, nullptr, m.attr("__name__").ptr());
    if (!fn) throw pybind11::error_already_set();
    m.add_object(def.ml_name, pybind11::reinterpret_steal<pybind11::object>(fn));
  }
}

}  // namespace bindings
}  // namespace imgtx
