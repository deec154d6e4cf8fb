// attention_forward_cpu_call: the whole forward call of a CPU attention in one C function.
//
// Why: a small attention call (a few hundred tokens, or one decode step) costs a few
// microseconds of kernel time, and torch's SDPA spends ~4 us per call in total. Going through
// pybind11's overload resolution with nested tuples, and reading every size and stride in
// Python first, cost ~19 us; the per-call checks and the output's allocation in Python cost
// ~9 us more, and ~30 us right after a model's torch ops, when the interpreter's caches are
// cold. This entry point is a METH_FASTCALL function: it asks torch's state (torch_state.h),
// takes the tensor objects themselves and reads what it needs through their Python methods
// (`shape`, `stride()`, `data_ptr()`, `dtype`: duck typing, no torch headers, no libtorch),
// checks everything the kernel needs, allocates the output through torch.empty_strided, then
// runs attention_forward_cpu without the GIL.
//
// It never raises for a call it cannot take: it returns None and leaves the error messages to
// the Python layer's general path (ops/fused_attention.py), which is the only place they are
// written. The operands it takes:
//
//   q, k, v      (B, H, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv), one float dtype (float32,
//                float16 or bfloat16), the last dim contiguous.
//   attn_mask    None, or a 2-4-D bool (True = visible) or additive float tensor broadcastable
//                to (B, H, Nq, Nk).
//   key_lengths  None, or (B,) contiguous int64 with values in [0, Nk].
//   scale        None (1 / sqrt(D)) or a Python float/int.
//   gqa          False: Hkv must equal H or be 1 (torch SDPA without enable_gqa).
// The backward's entry (attention_backward_cpu_call) reads the same operands the same way.
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <exception>

#include "bindings/bindings.h"
#include "bindings/torch_state.h"
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

// t.data_ptr(); false (a Python error may be set) when t has no such method.
bool read_data_ptr(PyObject* t, uintptr_t& out) {
  Owned ptr(call_method(t, g_data_ptr));
  if (!ptr.p || !PyLong_Check(ptr.p)) return false;
  out = uintptr_t(PyLong_AsUnsignedLongLong(ptr.p));
  return !PyErr_Occurred();
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
  return read_data_ptr(t, v.ptr);
}

// Whether t.dtype is the dtype object `dtype` (torch dtypes are singletons). Callers read a
// dtype once and compare the other tensors' to it: right after a model's torch ops each read
// of a tensor attribute costs 1-3 us (the interpreter's and torch's caches are cold).
bool has_dtype(PyObject* t, PyObject* dtype) {
  Owned d(PyObject_GetAttr(t, g_dtype));
  return d.p && d.p == dtype;
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

// What build_inputs reads from a call besides q, k and v.
struct CallArgs {
  PyObject *dtype;        // q's dtype object (borrowed)
  PyObject *mask, *key_lengths, *scale;
  long code, mask_code;   // the inputs' DType code; the mask's (0-2 additive, kMaskBool)
  int64_t causal_offset;  // kAttnNoCausal, or the kernels' offset (align_end: added Nk - Nq)
  bool align_end, gqa;
};

// Fills p from q, k, v and c: everything but the output and lse, checked as the kernels need it
// (validate() included). False when the call is not one this entry point takes.
bool build_inputs(PyObject* q, PyObject* k, PyObject* v, const CallArgs& c,
                  AttnForwardParams& p) {
  if (c.code < 0 || c.code > 2) return false;
  View qv, kv, vv;
  if (!read_view(q, 4, qv) || !read_view(k, 4, kv) || !read_view(v, 4, vv))
    return false;  // exactly 4-D: read_view takes min_ndim..4 dims
  if (!has_dtype(k, c.dtype) || !has_dtype(v, c.dtype)) return false;
  const int64_t B = qv.size[0], H = qv.size[1], Nq = qv.size[2], D = qv.size[3];
  const int64_t Hkv = kv.size[1], Nk = kv.size[2], Dv = vv.size[3];
  if (kv.size[0] != B || vv.size[0] != B || vv.size[1] != Hkv || vv.size[2] != Nk ||
      kv.size[3] != D)
    return false;
  if (Hkv <= 0 || H % Hkv != 0 || (!c.gqa && Hkv != H && Hkv != 1)) return false;
  if (B * H * Nq == 0 || Nk == 0 || D < 1 || D > kAttnMaxHeadDim || Dv < 1 ||
      Dv > kAttnMaxHeadDim)
    return false;  // empty calls and wide heads: the general path
  if (!dense_last(qv) || !dense_last(kv) || !dense_last(vv)) return false;

  p.batch = B, p.heads = H, p.kv_heads = Hkv, p.q_len = Nq, p.k_len = Nk;
  p.head_dim = D, p.v_dim = Dv;
  const DType dtype = DType(c.code);
  p.q = operand(qv, dtype);
  p.k = operand(kv, dtype);
  p.v = operand(vv, dtype);

  PyObject* scale = c.scale;
  if (scale == Py_None) {
    p.scale = float(1.0 / std::sqrt(double(D)));
  } else if (PyFloat_CheckExact(scale) || PyLong_CheckExact(scale)) {
    const double s = PyFloat_AsDouble(scale);
    if (PyErr_Occurred()) return false;
    p.scale = float(s);
  } else {
    return false;
  }
  p.causal = c.causal_offset != kAttnNoCausal;
  p.causal_offset = p.causal ? c.causal_offset + (c.align_end ? Nk - Nq : 0) : 0;

  if (c.mask != Py_None) {
    View mv;
    if (c.mask_code < 0 || c.mask_code > kMaskBool || !read_view(c.mask, 2, mv)) return false;
    const int64_t target[4] = {B, H, Nq, Nk};
    int64_t s[4];
    if (!broadcast_mask(mv, target, s)) return false;
    p.mask.data = reinterpret_cast<const void*>(mv.ptr);
    p.mask.kind = c.mask_code == kMaskBool ? AttnMaskKind::kBool : AttnMaskKind::kAdditive;
    p.mask.dtype = c.mask_code == kMaskBool ? DType::kFloat32 : DType(c.mask_code);
    p.mask.stride_batch = s[0], p.mask.stride_head = s[1];
    p.mask.stride_q = s[2], p.mask.stride_k = s[3];
  }
  if (c.key_lengths != Py_None) {
    View kl;
    if (!read_view(c.key_lengths, 1, kl) || kl.ndim != 1 || kl.size[0] != B ||
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

// p.out from `out`: exactly (B, H, Nq, Dv) in the dtype object `dtype`, the last dim dense.
bool attach_out(PyObject* out, PyObject* dtype, AttnForwardParams& p) {
  View ov;
  if (!read_view(out, 4, ov) || !has_dtype(out, dtype) || !dense_last(ov)) return false;
  if (ov.size[0] != p.batch || ov.size[1] != p.heads || ov.size[2] != p.q_len ||
      ov.size[3] != p.v_dim)
    return false;
  p.out = output(ov, p.q.dtype);
  return true;
}

// p.lse from `lse`: exactly (B, H, Nq), contiguous (its dtype is the caller's to check).
bool attach_lse(PyObject* lse, AttnForwardParams& p) {
  View lv;
  if (!read_view(lse, 3, lv) || lv.ndim != 3 || lv.size[0] != p.batch || lv.size[1] != p.heads ||
      lv.size[2] != p.q_len || lv.stride[2] != 1 || lv.stride[1] != p.q_len ||
      lv.stride[0] != p.heads * p.q_len)
    return false;
  p.lse = reinterpret_cast<float*>(lv.ptr);
  return true;
}

// The DType code of the mask's dtype object (0-2 additive, kMaskBool), -1 when unsupported.
int mask_dtype_code(PyObject* mask) {
  Owned dtype(PyObject_GetAttr(mask, g_dtype));
  if (!dtype.p) return -1;
  return is_bool_dtype(dtype.p) ? kMaskBool : float_dtype_code(dtype.p);
}

// Fills c's dtype codes from q's dtype object (the caller holds it) and c.mask's dtype, and
// checks that c.key_lengths (if any) is int64. False, with no Python error left set, for a call
// the kernels do not take (another dtype, an int mask, int32 key_lengths: the general path
// converts or reports them). Both entry points use it, so they decline the same calls.
bool read_dtype_codes(PyObject* dtype, CallArgs& c) {
  c.dtype = dtype;
  c.code = float_dtype_code(dtype);
  c.mask_code = c.mask == Py_None ? -1 : mask_dtype_code(c.mask);
  bool ok = c.code >= 0 && (c.mask == Py_None || c.mask_code >= 0);
  if (ok && c.key_lengths != Py_None) {
    Owned kl_dtype(PyObject_GetAttr(c.key_lengths, g_dtype));
    ok = kl_dtype.p && is_int64_dtype(kl_dtype.p);
  }
  if (!ok) PyErr_Clear();
  return ok;
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

// attention_forward_cpu_call(q, k, v, causal_offset, align_end, key_lengths, attn_mask, scale,
//                            gqa, contiguous, want_lse) -> (out, lse or None), or None
// The whole eager forward of a plain CPU call: the torch state checks (torch_state.h), the
// operands', the output's allocation (torch.empty_strided) and the kernel. None: the call must
// take the general path (which reports any error); nothing was allocated or run.
//   causal_offset  kAttnNoCausal, or the kernels' offset; align_end adds Nk - Nq (bottom-right).
//   contiguous     out laid out (B, H, Nq, Dv), as torch's SDPA returns it; else (B, Nq, H, Dv)
//                  memory, what the output projection reads.
//   want_lse       also return lse, (B, H, Nq) float32.
PyObject* attention_forward_cpu_call(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 11) {
    PyErr_Format(PyExc_TypeError, "attention_forward_cpu_call takes 11 arguments, got %zd", nargs);
    return nullptr;
  }
  PyObject *q = a[0], *k = a[1], *v = a[2], *key_lengths = a[5], *mask = a[6];
  if (q == Py_None || k == Py_None || v == Py_None) Py_RETURN_NONE;
  PyObject* const tensors[5] = {q, k, v, key_lengths, mask};
  int ok = eager_tensors_ok(tensors, 5, false);
  if (ok > 0) ok = eager_kernels_ok();
  if (ok < 0) return nullptr;
  if (ok == 0) Py_RETURN_NONE;

  CallArgs c{nullptr, mask, key_lengths, a[7], -1, -1, PyLong_AsLongLong(a[3]), false, false};
  const int align_end = PyObject_IsTrue(a[4]), gqa = PyObject_IsTrue(a[8]);
  const int contiguous = PyObject_IsTrue(a[9]), want_lse = PyObject_IsTrue(a[10]);
  if (PyErr_Occurred() || align_end < 0 || gqa < 0 || contiguous < 0 || want_lse < 0) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  c.align_end = align_end != 0, c.gqa = gqa != 0;
  Owned dtype(PyObject_GetAttr(q, g_dtype));
  if (!dtype.p) return nullptr;  // a torch.Tensor without dtype: not a call to decline
  if (!read_dtype_codes(dtype.p, c)) Py_RETURN_NONE;
  AttnForwardParams p;
  if (!build_inputs(q, k, v, c, p)) {
    PyErr_Clear();  // whatever a method lookup left: the general path reports errors
    Py_RETURN_NONE;
  }
  const int threads = torch_num_threads();
  if (threads < 0) return nullptr;

  const int64_t B = p.batch, H = p.heads, Nq = p.q_len, Dv = p.v_dim;
  const int64_t size[4] = {B, H, Nq, Dv};
  const int64_t bhnd[4] = {H * Nq * Dv, Nq * Dv, Dv, 1}, bnhd[4] = {Nq * H * Dv, Dv, H * Dv, 1};
  const int64_t* out_stride = contiguous ? bhnd : bnhd;
  Owned out(new_torch_tensor(size, out_stride, 4, dtype.p));
  if (!out.p) return nullptr;
  const int64_t lse_stride[3] = {H * Nq, Nq, 1};
  Owned lse(want_lse ? new_torch_tensor(size, lse_stride, 3, float32_dtype()) : nullptr);
  if (want_lse && !lse.p) return nullptr;
  // torch.empty_strided gives the sizes and strides asked for: only the data pointers are
  // read back (each read of a tensor attribute costs 1-3 us right after torch ops)
  uintptr_t out_ptr = 0, lse_ptr = 0;
  if (!read_data_ptr(out.p, out_ptr) || (lse.p && !read_data_ptr(lse.p, lse_ptr))) {
    if (!PyErr_Occurred())
      PyErr_SetString(PyExc_RuntimeError, "attention: torch.empty_strided gave no tensor");
    return nullptr;
  }
  p.out = {reinterpret_cast<void*>(out_ptr), p.q.dtype, out_stride[0], out_stride[1],
           out_stride[2]};
  p.lse = lse.p ? reinterpret_cast<float*>(lse_ptr) : nullptr;
  Owned done(run_without_gil([&] { attention_forward_cpu(p, threads); }));
  if (!done.p) return nullptr;
  return PyTuple_Pack(2, out.p, lse.p ? lse.p : Py_None);
}

// A gradient operand: exactly (d0, d1, d2, d3), in the dtype object `dtype`, last dim dense.
bool read_grad(PyObject* t, PyObject* dtype, int64_t d0, int64_t d1, int64_t d2, int64_t d3,
               View& v) {
  return read_view(t, 4, v) && has_dtype(t, dtype) && dense_last(v) && v.size[0] == d0 &&
         v.size[1] == d1 && v.size[2] == d2 && v.size[3] == d3;
}

// attention_backward_cpu_call(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, attn_mask,
//                             key_lengths, scale, causal_offset) -> bool
// The backward of a plain eager CPU call in one compiled call, as the forward's: the same state
// checks (eager_kernels_ok: no emulator context, ...), the forward's operands (checked by
// build_inputs, GQA allowed, lse float32 and required), grad_out shaped like out, grad_lse None
// or (B, H, Nq) contiguous float32, dq/dk/dv shaped like q/k/v (written). False: nothing
// written, the caller takes the general path.
PyObject* attention_backward_cpu_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 14) {
    PyErr_Format(PyExc_TypeError, "attention_backward_cpu_call takes 14 arguments, got %zd",
                 nargs);
    return nullptr;
  }
  PyObject *grad_out = args[0], *grad_lse = args[1], *q = args[2], *lse = args[6];
  PyObject* mask = args[10];
  const int state = eager_kernels_ok();
  if (state < 0) return nullptr;
  if (state == 0 || q == Py_None || lse == Py_None) Py_RETURN_FALSE;
  Owned dtype(PyObject_GetAttr(q, g_dtype));
  Owned lse_dtype(PyObject_GetAttr(lse, g_dtype));
  CallArgs c{nullptr, mask, args[11], args[12], -1, -1, PyLong_AsLongLong(args[13]), false, true};
  if (PyErr_Occurred() || !dtype.p || lse_dtype.p != float32_dtype() ||
      !read_dtype_codes(dtype.p, c)) {
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  AttnForwardParams f;
  AttnBackwardParams p;
  View gv, dqv, dkv, dvv;
  // the forward's operands, read and checked as its: the gradients must match their shapes
  bool ok = build_inputs(q, args[3], args[4], c, f) && attach_out(args[5], dtype.p, f) &&
            attach_lse(lse, f);
  const int64_t B = f.batch, H = f.heads, Hkv = f.kv_heads, Nq = f.q_len, Nk = f.k_len;
  ok = ok && read_grad(grad_out, dtype.p, B, H, Nq, f.v_dim, gv) &&
       read_grad(args[7], dtype.p, B, H, Nq, f.head_dim, dqv) &&
       read_grad(args[8], dtype.p, B, Hkv, Nk, f.head_dim, dkv) &&
       read_grad(args[9], dtype.p, B, Hkv, Nk, f.v_dim, dvv);
  if (ok && grad_lse != Py_None) {
    View lv;
    ok = read_view(grad_lse, 3, lv) && lv.ndim == 3 && has_dtype(grad_lse, float32_dtype()) &&
         lv.size[0] == f.batch && lv.size[1] == f.heads && lv.size[2] == f.q_len &&
         lv.stride[2] == 1 && lv.stride[1] == f.q_len && lv.stride[0] == f.heads * f.q_len;
    if (ok) p.grad_lse = reinterpret_cast<const float*>(lv.ptr);
  }
  if (!ok) {
    PyErr_Clear();  // whatever a method lookup left: the general path reports errors
    Py_RETURN_FALSE;
  }
  const int threads = torch_num_threads();
  if (threads < 0) return nullptr;
  static_cast<AttnParams&>(p) = static_cast<const AttnParams&>(f);
  const DType dt = f.q.dtype;
  p.out = {f.out.data, dt, f.out.stride_batch, f.out.stride_head, f.out.stride_row};
  p.grad_out = operand(gv, dt);
  p.lse = f.lse;
  p.grad_q = output(dqv, dt);
  p.grad_k = output(dkv, dt);
  p.grad_v = output(dvv, dt);
  return run_without_gil([&] { attention_backward_cpu(p, threads); });
}

PyMethodDef g_eager_def = {
    "attention_forward_cpu_call",
    reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&attention_forward_cpu_call)),
    METH_FASTCALL,
    "attention_forward_cpu_call(q, k, v, causal_offset, align_end, key_lengths, attn_mask, "
    "scale, gqa, contiguous, want_lse) -> (out, lse or None), or None for a call that must take "
    "the general path: a plain eager CPU forward in one call."};

PyMethodDef g_eager_backward_def = {
    "attention_backward_cpu_call",
    reinterpret_cast<PyCFunction>(
        reinterpret_cast<void (*)(void)>(&attention_backward_cpu_call)),
    METH_FASTCALL,
    "attention_backward_cpu_call(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, attn_mask, "
    "key_lengths, scale, causal_offset) -> bool: the CPU backward of a plain eager call on the "
    "tensors themselves; False (nothing written) for a call it does not take."};

}  // namespace

void register_attention_eager(pybind11::module_& m) {
  g_shape = PyUnicode_InternFromString("shape");
  g_stride = PyUnicode_InternFromString("stride");
  g_data_ptr = PyUnicode_InternFromString("data_ptr");
  g_dtype = PyUnicode_InternFromString("dtype");
  if (!g_shape || !g_stride || !g_data_ptr || !g_dtype) throw pybind11::error_already_set();
  PyObject* fn = PyCFunction_NewEx(&g_eager_def, nullptr, m.attr("__name__").ptr());
  if (!fn) throw pybind11::error_already_set();
  m.add_object("attention_forward_cpu_call", pybind11::reinterpret_steal<pybind11::object>(fn));
  PyObject* bwd = PyCFunction_NewEx(&g_eager_backward_def, nullptr, m.attr("__name__").ptr());
  if (!bwd) throw pybind11::error_already_set();
  m.add_object("attention_backward_cpu_call", pybind11::reinterpret_steal<pybind11::object>(bwd));
}

}  // namespace bindings
}  // namespace imgtx
