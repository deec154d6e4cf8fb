// attention_forward_cpu_eager: the whole forward call of a CPU attention in one C function.
//
// Why: a small attention call (a few hundred tokens, or one decode step) costs a few
// microseconds of kernel time, and torch's SDPA spends ~4 us per call in total. Going through
// pybind11's overload resolution with nested tuples, and reading every size and stride in
// Python first, cost ~19 us. This entry point is a METH_FASTCALL function: it takes the tensor
// objects themselves and reads what it needs through their Python methods (`shape`, `stride()`,
// `data_ptr()`, `dtype`: duck typing, no torch headers, no libtorch), checks everything the
// kernel needs, then runs attention_forward_cpu without the GIL.
//
// It never raises for a call it cannot take: it returns False and leaves the error messages to
// the Python layer's general path (ops/fused_attention.py), which is the only place they are
// written. It returns True once `out` (and `lse`, when given) hold the result.
//
//   attention_forward_cpu_eager(q, k, v, out, lse, dtype_code, attn_mask, mask_code,
//                               key_lengths, scale, causal_offset, gqa, num_threads) -> bool
//
//   q, k, v      (B, H, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv), one float dtype (dtype_code:
//                0 float32, 1 float16, 2 bfloat16), the last dim contiguous.
//   out          (B, H, Nq, Dv) in q's dtype, any strides with the last dim contiguous.
//   lse          None, or (B, H, Nq) contiguous float32.
//   attn_mask    None, or a 2-4-D tensor broadcastable to (B, H, Nq, Nk); mask_code 0-2 an
//                additive mask of that float dtype, 3 a bool mask (True = visible).
//   key_lengths  None, or (B,) contiguous int64 with values in [0, Nk].
//   scale        None (1 / sqrt(D)) or a Python float/int.
//   causal_offset ATTN_NO_CAUSAL, or query i sees keys j <= i + causal_offset.
//   gqa          False: Hkv must equal H or be 1 (torch SDPA without enable_gqa).
//   num_threads  the threads the kernel may use.
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <exception>

#include "bindings/bindings.h"
#include "imgtx/attention.h"

namespace imgtx {
namespace bindings {

namespace {

constexpr int kMaskBool = 3;

PyObject* g_shape = nullptr;     // interned attribute and method names
PyObject* g_stride = nullptr;
PyObject* g_data_ptr = nullptr;
PyObject* g_dtype = nullptr;

// An owned reference, released on scope exit.
struct Owned {
  PyObject* p;
  explicit Owned(PyObject* o) : p(o) {}
  ~Owned() { Py_XDECREF(p); }
  Owned(const Owned&) = delete;
  Owned& operator=(const Owned&) = delete;
};

// A tensor's sizes, strides (elements) and data pointer, as its Python methods report them.
struct View {
  int ndim = 0;
  int64_t size[4] = {0, 0, 0, 0};
  int64_t stride[4] = {0, 0, 0, 0};
  uintptr_t ptr = 0;
};

// Reads up to 4 ints of a tuple (torch.Size is one); false on anything else.
bool read_ints(PyObject* tuple, int n, int64_t* out) {
  if (!tuple || !PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != n) return false;
  for (int i = 0; i < n; ++i) {
    PyObject* item = PyTuple_GET_ITEM(tuple, i);
    if (!PyLong_Check(item)) return false;
    out[i] = PyLong_AsLongLong(item);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

PyObject* call_method(PyObject* self, PyObject* name) {
  PyObject* args[1] = {self};
  return PyObject_VectorcallMethod(name, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
}

// View of a tensor of min_ndim..4 dims; false (a Python error may be set: the caller clears it)
// when t lacks the methods or has another rank.
bool read_view(PyObject* t, int min_ndim, View& v) {
  Owned shape(PyObject_GetAttr(t, g_shape));
  if (!shape.p || !PyTuple_Check(shape.p)) return false;
  const Py_ssize_t n = PyTuple_GET_SIZE(shape.p);
  if (n < min_ndim || n > 4) return false;
  v.ndim = int(n);
  if (!read_ints(shape.p, v.ndim, v.size)) return false;
  Owned stride(call_method(t, g_stride));
  if (!read_ints(stride.p, v.ndim, v.stride)) return false;
  Owned ptr(call_method(t, g_data_ptr));
  if (!ptr.p || !PyLong_Check(ptr.p)) return false;
  v.ptr = uintptr_t(PyLong_AsUnsignedLongLong(ptr.p));
  return !PyErr_Occurred();
}

bool same_dtype(PyObject* a, PyObject* b) {
  Owned da(PyObject_GetAttr(a, g_dtype)), db(PyObject_GetAttr(b, g_dtype));
  return da.p && da.p == db.p;  // torch dtypes are singletons
}

bool dense_last(const View& v) { return v.stride[3] == 1 || v.size[3] == 1; }

AttnTensor operand(const View& v, DType dtype) {
  AttnTensor t;
  t.data = reinterpret_cast<const void*>(v.ptr);
  t.dtype = dtype;
  t.stride_batch = v.stride[0];
  t.stride_head = v.stride[1];
  t.stride_row = v.stride[2];
  return t;
}

AttnOutput output(const View& v, DType dtype) {
  return {reinterpret_cast<void*>(v.ptr), dtype, v.stride[0], v.stride[1], v.stride[2]};
}

// The mask's strides over (B, H, Nq, Nk), broadcast as torch does (trailing dims aligned,
// size-1 dims read with stride 0); false when it does not broadcast to that shape.
bool broadcast_mask(const View& m, const int64_t target[4], int64_t strides[4]) {
  for (int d = 0; d < 4; ++d) strides[d] = 0;
  for (int i = 0; i < m.ndim; ++i) {
    const int d = 4 - m.ndim + i;
    if (m.size[i] == target[d])
      strides[d] = target[d] == 1 ? 0 : m.stride[i];
    else if (m.size[i] != 1)
      return false;
  }
  return true;
}

// Fills p from the call's objects; false when the call is not one this entry point takes.
bool build(PyObject* const* a, AttnForwardParams& p) {
  PyObject *q = a[0], *k = a[1], *v = a[2], *out = a[3], *lse = a[4], *mask = a[6],
           *key_lengths = a[8], *scale = a[9];
  const long code = PyLong_AsLong(a[5]);
  const long mask_code = PyLong_AsLong(a[7]);
  const int64_t causal_offset = PyLong_AsLongLong(a[10]);
  const int gqa = PyObject_IsTrue(a[11]);
  if (PyErr_Occurred() || code < 0 || code > 2 || gqa < 0) return false;
  View qv, kv, vv, ov;
  if (!read_view(q, 4, qv) || !read_view(k, 4, kv) || !read_view(v, 4, vv) ||
      !read_view(out, 4, ov))  // exactly 4-D: read_view takes min_ndim..4 dims
    return false;
  if (!same_dtype(q, k) || !same_dtype(q, v) || !same_dtype(q, out)) return false;
  const int64_t B = qv.size[0], H = qv.size[1], Nq = qv.size[2], D = qv.size[3];
  const int64_t Hkv = kv.size[1], Nk = kv.size[2], Dv = vv.size[3];
  if (kv.size[0] != B || vv.size[0] != B || vv.size[1] != Hkv || vv.size[2] != Nk ||
      kv.size[3] != D)
    return false;
  if (Hkv <= 0 || H % Hkv != 0 || (!gqa && Hkv != H && Hkv != 1)) return false;
  if (B * H * Nq == 0 || Nk == 0 || D < 1 || D > kAttnMaxHeadDim || Dv < 1 ||
      Dv > kAttnMaxHeadDim)
    return false;  // empty calls and wide heads: the general path
  if (ov.size[0] != B || ov.size[1] != H || ov.size[2] != Nq || ov.size[3] != Dv) return false;
  if (!dense_last(qv) || !dense_last(kv) || !dense_last(vv) || !dense_last(ov)) return false;

  p.batch = B, p.heads = H, p.kv_heads = Hkv, p.q_len = Nq, p.k_len = Nk;
  p.head_dim = D, p.v_dim = Dv;
  const DType dtype = DType(code);
  p.q = operand(qv, dtype);
  p.k = operand(kv, dtype);
  p.v = operand(vv, dtype);
  p.out = output(ov, dtype);

  if (scale == Py_None) {
    p.scale = float(1.0 / std::sqrt(double(D)));
  } else if (PyFloat_CheckExact(scale) || PyLong_CheckExact(scale)) {
    const double s = PyFloat_AsDouble(scale);
    if (PyErr_Occurred()) return false;
    p.scale = float(s);
  } else {
    return false;
  }
  p.causal = causal_offset != kAttnNoCausal;
  p.causal_offset = p.causal ? causal_offset : 0;

  if (lse != Py_None) {
    View lv;
    if (!read_view(lse, 3, lv) || lv.ndim != 3 || lv.size[0] != B || lv.size[1] != H ||
        lv.size[2] != Nq || lv.stride[2] != 1 || lv.stride[1] != Nq || lv.stride[0] != H * Nq)
      return false;
    p.lse = reinterpret_cast<float*>(lv.ptr);
  }
  if (mask != Py_None) {
    View mv;
    if (mask_code < 0 || mask_code > kMaskBool || !read_view(mask, 2, mv)) return false;
    const int64_t target[4] = {B, H, Nq, Nk};
    int64_t s[4];
    if (!broadcast_mask(mv, target, s)) return false;
    p.mask.data = reinterpret_cast<const void*>(mv.ptr);
    p.mask.kind = mask_code == kMaskBool ? AttnMaskKind::kBool : AttnMaskKind::kAdditive;
    p.mask.dtype = mask_code == kMaskBool ? DType::kFloat32 : DType(mask_code);
    p.mask.stride_batch = s[0], p.mask.stride_head = s[1];
    p.mask.stride_q = s[2], p.mask.stride_k = s[3];
  }
  if (key_lengths != Py_None) {
    View kl;
    if (!read_view(key_lengths, 1, kl) || kl.ndim != 1 || kl.size[0] != B ||
        (kl.stride[0] != 1 && B != 1))
      return false;
    p.key_lengths = reinterpret_cast<const int64_t*>(kl.ptr);
  }
  try {
    validate(p);  // values too (key_lengths in range): a call it rejects takes the general path
  } catch (const std::exception&) {
    return false;
  }
  return true;
}

// Runs the kernel call without the GIL: True, or NULL with its C++ exception as a Python error.
template <class Call>
PyObject* run_without_gil(Call&& call) {
  std::exception_ptr error;
  Py_BEGIN_ALLOW_THREADS
  try {
    call();
  } catch (...) {
    error = std::current_exception();
  }
  Py_END_ALLOW_THREADS
  if (error) {
    try {
      std::rethrow_exception(error);
    } catch (const std::bad_alloc&) {
      return PyErr_NoMemory();
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    } catch (...) {
      PyErr_SetString(PyExc_RuntimeError, "attention: unknown C++ exception");
    }
    return nullptr;
  }
  Py_RETURN_TRUE;
}

PyObject* attention_forward_cpu_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 13) {
    PyErr_Format(PyExc_TypeError, "attention_forward_cpu_eager takes 13 arguments, got %zd", nargs);
    return nullptr;
  }
  AttnForwardParams p;
  if (!build(args, p)) {
    PyErr_Clear();  // whatever a method lookup left: the general path reports errors
    Py_RETURN_FALSE;
  }
  const long threads = PyLong_AsLong(args[12]);
  if (PyErr_Occurred()) return nullptr;
  return run_without_gil([&] { attention_forward_cpu(p, int(threads < 1 ? 1 : threads)); });
}

// A gradient operand: exactly (d0, d1, d2, d3), in the dtype object of dtype_of, last dim dense.
bool read_grad(PyObject* t, PyObject* dtype_of, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
               View& v) {
  return read_view(t, 4, v) && same_dtype(t, dtype_of) && dense_last(v) && v.size[0] == d0 &&
         v.size[1] == d1 && v.size[2] == d2 && v.size[3] == d3;
}

// attention_backward_cpu_eager(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, dtype_code,
//                              attn_mask, mask_code, key_lengths, scale, causal_offset, gqa,
//                              num_threads) -> bool
// The backward of a plain eager CPU call in one compiled call, as the forward's: the forward's
// operands (checked by build(), lse required), grad_out shaped like out, grad_lse None or
// (B, H, Nq) contiguous float32, dq/dk/dv shaped like q/k/v (written). False: nothing written,
// the caller takes the general path.
PyObject* attention_backward_cpu_eager(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 18) {
    PyErr_Format(PyExc_TypeError, "attention_backward_cpu_eager takes 18 arguments, got %zd",
                 nargs);
    return nullptr;
  }
  PyObject *grad_out = args[0], *grad_lse = args[1], *q = args[2];
  // The forward's argument layout for build(): q, k, v, out, lse, dtype_code, attn_mask,
  // mask_code, key_lengths, scale, causal_offset, gqa.
  PyObject* const fwd[12] = {q, args[3], args[4], args[5], args[6], args[10], args[11],
                             args[12], args[13], args[14], args[15], args[16]};
  AttnForwardParams f;
  AttnBackwardParams p;
  View gv, dqv, dkv, dvv;
  // build() has read and checked q, k, v and out: the gradients must match their shapes
  bool ok = args[6] != Py_None && build(fwd, f);
  const int64_t B = f.batch, H = f.heads, Hkv = f.kv_heads, Nq = f.q_len, Nk = f.k_len;
  ok = ok && read_grad(grad_out, q, B, H, Nq, f.v_dim, gv) &&
       read_grad(args[7], q, B, H, Nq, f.head_dim, dqv) &&
       read_grad(args[8], q, B, Hkv, Nk, f.head_dim, dkv) &&
       read_grad(args[9], q, B, Hkv, Nk, f.v_dim, dvv);
  if (ok && grad_lse != Py_None) {
    View lv;
    ok = read_view(grad_lse, 3, lv) && lv.ndim == 3 && same_dtype(grad_lse, args[6]) &&
         lv.size[0] == f.batch && lv.size[1] == f.heads && lv.size[2] == f.q_len &&
         lv.stride[2] == 1 && lv.stride[1] == f.q_len && lv.stride[0] == f.heads * f.q_len;
    if (ok) p.grad_lse = reinterpret_cast<const float*>(lv.ptr);
  }
  if (!ok) {
    PyErr_Clear();  // whatever a method lookup left: the general path reports errors
    Py_RETURN_FALSE;
  }
  static_cast<AttnParams&>(p) = static_cast<const AttnParams&>(f);
  const DType dtype = f.q.dtype;
  p.out = {f.out.data, dtype, f.out.stride_batch, f.out.stride_head, f.out.stride_row};
  p.grad_out = operand(gv, dtype);
  p.lse = f.lse;
  p.grad_q = output(dqv, dtype);
  p.grad_k = output(dkv, dtype);
  p.grad_v = output(dvv, dtype);
  const long threads = PyLong_AsLong(args[17]);
  if (PyErr_Occurred()) return nullptr;
  return run_without_gil([&] { attention_backward_cpu(p, int(threads < 1 ? 1 : threads)); });
}

PyMethodDef g_eager_def = {
    "attention_forward_cpu_eager",
    reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&attention_forward_cpu_eager)),
    METH_FASTCALL,
    "attention_forward_cpu_eager(q, k, v, out, lse, dtype_code, attn_mask, mask_code, "
    "key_lengths, scale, causal_offset, gqa, num_threads) -> bool: the CPU forward on the "
    "tensors themselves; False (nothing written) for a call it does not take."};

PyMethodDef g_eager_backward_def = {
    "attention_backward_cpu_eager",
    reinterpret_cast<PyCFunction>(
        reinterpret_cast<void (*)(void)>(&attention_backward_cpu_eager)),
    METH_FASTCALL,
    "attention_backward_cpu_eager(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, dtype_code, "
    "attn_mask, mask_code, key_lengths, scale, causal_offset, gqa, num_threads) -> bool: the CPU "
    "backward on the tensors themselves; False (nothing written) for a call it does not take."};

}  // namespace

void register_attention_eager(pybind11::module_& m) {
  g_shape = PyUnicode_InternFromString("shape");
  g_stride = PyUnicode_InternFromString("stride");
  g_data_ptr = PyUnicode_InternFromString("data_ptr");
  g_dtype = PyUnicode_InternFromString("dtype");
  if (!g_shape || !g_stride || !g_data_ptr || !g_dtype) throw pybind11::error_already_set();
  PyObject* fn = PyCFunction_NewEx(&g_eager_def, nullptr, m.attr("__name__").ptr());
  if (!fn) throw pybind11::error_already_set();
  m.add_object("attention_forward_cpu_eager", pybind11::reinterpret_steal<pybind11::object>(fn));
  PyObject* bwd = PyCFunction_NewEx(&g_eager_backward_def, nullptr, m.attr("__name__").ptr());
  if (!bwd) throw pybind11::error_already_set();
  m.add_object("attention_backward_cpu_eager", pybind11::reinterpret_steal<pybind11::object>(bwd));
}

}  // namespace bindings
}  // namespace imgtx
