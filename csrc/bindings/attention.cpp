// Bindings of the attention family. Tensors arrive as tuples of integers: inputs
// (ptr, dtype, stride_batch, stride_head, stride_row), the mask as
// (ptr, kind, dtype, stride_batch, stride_head, stride_q, stride_k), the pattern as the list
// [kind, block, filter_width, causal, height, width, query_h, query_w, flange_h, flange_w].
#include <cstdint>
#include <tuple>
#include <vector>

#include <pybind11/stl.h>

#include "bindings/bindings.h"
#include "imgtx/attention.h"

namespace imgtx {
namespace bindings {

namespace py = pybind11;

namespace {

using Sizes = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
using TensorArg = std::tuple<uintptr_t, int, int64_t, int64_t, int64_t>;
using MaskArg = std::tuple<uintptr_t, int, int, int64_t, int64_t, int64_t, int64_t>;

DType to_dtype(int code, const char* what) {
  if (code < 0 || code > 2)
    throw py::type_error(std::string("attention: ") + what + " dtype code must be 0, 1 or 2");
  return DType(code);
}

AttnTensor to_tensor(const TensorArg& a) {
  AttnTensor t;
  t.data = reinterpret_cast<const void*>(std::get<0>(a));
  t.dtype = to_dtype(std::get<1>(a), "tensor");
  t.stride_batch = std::get<2>(a);
  t.stride_head = std::get<3>(a);
  t.stride_row = std::get<4>(a);
  return t;
}

AttnOutput to_output(const TensorArg& a) {
  const AttnTensor t = to_tensor(a);
  return {const_cast<void*>(t.data), t.dtype, t.stride_batch, t.stride_head, t.stride_row};
}

void fill_common(AttnParams& p, const Sizes& sizes, const TensorArg& q, const TensorArg& k,
                 const TensorArg& v, float scale, int64_t causal_offset, const MaskArg& mask,
                 uintptr_t key_lengths, const std::vector<int64_t>& pattern) {
  std::tie(p.batch, p.heads, p.kv_heads, p.q_len, p.k_len, p.head_dim, p.v_dim) = sizes;
  p.q = to_tensor(q);
  p.k = to_tensor(k);
  p.v = to_tensor(v);
  p.scale = scale;
  p.causal = causal_offset != kAttnNoCausal;
  p.causal_offset = p.causal ? causal_offset : 0;
  p.key_lengths = reinterpret_cast<const int64_t*>(key_lengths);
  const int kind = std::get<1>(mask);
  if (kind < 0 || kind > 2) throw py::value_error("attention: bad mask kind");
  p.mask.data = reinterpret_cast<const void*>(std::get<0>(mask));
  p.mask.kind = AttnMaskKind(kind);
  p.mask.dtype = to_dtype(std::get<2>(mask), "attn_mask");
  p.mask.stride_batch = std::get<3>(mask);
  p.mask.stride_head = std::get<4>(mask);
  p.mask.stride_q = std::get<5>(mask);
  p.mask.stride_k = std::get<6>(mask);
  if (pattern.size() != 10) throw py::value_error("attention: pattern must have 10 entries");
  p.pattern.kind = AttnPatternKind(pattern[0]);
  p.pattern.block = pattern[1];
  p.pattern.filter_width = pattern[2];
  p.pattern.causal = pattern[3] != 0;
  p.pattern.height = pattern[4];
  p.pattern.width = pattern[5];
  p.pattern.query_h = pattern[6];
  p.pattern.query_w = pattern[7];
  p.pattern.flange_h = pattern[8];
  p.pattern.flange_w = pattern[9];
}

using OutArg = std::tuple<uintptr_t, int64_t, int64_t, int64_t>;

AttnForwardParams forward_params(const Sizes& sizes, const TensorArg& q, const TensorArg& k,
                                 const TensorArg& v, const OutArg& out, uintptr_t lse,
                                 float scale, int64_t causal_offset, const MaskArg& mask,
                                 uintptr_t key_lengths, const std::vector<int64_t>& pattern) {
  AttnForwardParams p;
  fill_common(p, sizes, q, k, v, scale, causal_offset, mask, key_lengths, pattern);
  p.out = {reinterpret_cast<void*>(std::get<0>(out)), p.q.dtype, std::get<1>(out),
           std::get<2>(out), std::get<3>(out)};
  p.lse = reinterpret_cast<float*>(lse);
  return p;
}

AttnBackwardParams backward_params(const Sizes& sizes, const TensorArg& q, const TensorArg& k,
                                   const TensorArg& v, const TensorArg& out,
                                   const TensorArg& grad_out, uintptr_t lse, uintptr_t grad_lse,
                                   const TensorArg& dq, const TensorArg& dk, const TensorArg& dv,
                                   float scale, int64_t causal_offset, const MaskArg& mask,
                                   uintptr_t key_lengths, const std::vector<int64_t>& pattern) {
  AttnBackwardParams p;
  fill_common(p, sizes, q, k, v, scale, causal_offset, mask, key_lengths, pattern);
  p.out = to_tensor(out);
  p.grad_out = to_tensor(grad_out);
  p.lse = reinterpret_cast<const float*>(lse);
  p.grad_lse = reinterpret_cast<const float*>(grad_lse);
  p.grad_q = to_output(dq);
  p.grad_k = to_output(dk);
  p.grad_v = to_output(dv);
  return p;
}

}  // namespace

void register_attention(py::module_& m) {
  m.attr("ATTN_NO_CAUSAL") = kAttnNoCausal;
  m.attr("ATTN_LSE_EMPTY") = kLseEmpty;
  m.def("attention_forward_cpu",
        [](const Sizes& sizes, const TensorArg& q, const TensorArg& k, const TensorArg& v,
           const OutArg& out, uintptr_t lse, float scale, int64_t causal_offset,
           const MaskArg& mask, uintptr_t key_lengths, const std::vector<int64_t>& pattern,
           int num_threads) {
          const AttnForwardParams p = forward_params(sizes, q, k, v, out, lse, scale,
                                                     causal_offset, mask, key_lengths, pattern);
          py::gil_scoped_release release;
          attention_forward_cpu(p, num_threads);
        });
  m.def("attention_backward_cpu",
        [](const Sizes& sizes, const TensorArg& q, const TensorArg& k, const TensorArg& v,
           const TensorArg& out, const TensorArg& grad_out, uintptr_t lse, uintptr_t grad_lse,
           const TensorArg& dq, const TensorArg& dk, const TensorArg& dv, float scale,
           int64_t causal_offset, const MaskArg& mask, uintptr_t key_lengths,
           const std::vector<int64_t>& pattern, int num_threads) {
          const AttnBackwardParams p =
              backward_params(sizes, q, k, v, out, grad_out, lse, grad_lse, dq, dk, dv, scale,
                              causal_offset, mask, key_lengths, pattern);
          py::gil_scoped_release release;
          attention_backward_cpu(p, num_threads);
        });
  // CUDA: the same arguments (device pointers) plus a workspace and the stream. The
  // *_workspace_size functions take the arguments with null pointers. Whether the kernels take
  // a call is decided per pass: backward=True asks for the backward (more shared memory).
  m.def(
      "attention_cuda_supported",
      [](const Sizes& sizes, const TensorArg& q, const TensorArg& k, const TensorArg& v,
         int64_t causal_offset, const MaskArg& mask, uintptr_t key_lengths,
         const std::vector<int64_t>& pattern, bool backward) {
        AttnParams p;
        fill_common(p, sizes, q, k, v, 1.0f, causal_offset, mask, key_lengths, pattern);
        return attention_cuda_supported(p, backward ? AttnPass::kBackward : AttnPass::kForward);
      },
      py::arg("sizes"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("causal_offset"),
      py::arg("mask"), py::arg("key_lengths"), py::arg("pattern"), py::arg("backward") = false);
  m.def("attention_forward_cuda_workspace_size",
        [](const Sizes& sizes, const TensorArg& q, const TensorArg& k, const TensorArg& v,
           const OutArg& out, uintptr_t lse, float scale, int64_t causal_offset,
           const MaskArg& mask, uintptr_t key_lengths, const std::vector<int64_t>& pattern) {
          return attention_forward_cuda_workspace_size(forward_params(
              sizes, q, k, v, out, lse, scale, causal_offset, mask, key_lengths, pattern));
        });
  m.def("attention_forward_cuda",
        [](const Sizes& sizes, const TensorArg& q, const TensorArg& k, const TensorArg& v,
           const OutArg& out, uintptr_t lse, float scale, int64_t causal_offset,
           const MaskArg& mask, uintptr_t key_lengths, const std::vector<int64_t>& pattern,
           uintptr_t workspace, uintptr_t stream) {
          const AttnForwardParams p = forward_params(sizes, q, k, v, out, lse, scale,
                                                     causal_offset, mask, key_lengths, pattern);
          py::gil_scoped_release release;
          attention_forward_cuda(p, reinterpret_cast<void*>(workspace), reinterpret_cast<void*>(stream));
        });
  m.def("attention_backward_cuda_workspace_size",
        [](const Sizes& sizes, const TensorArg& q, const TensorArg& k, const TensorArg& v,
           const TensorArg& out, const TensorArg& grad_out, uintptr_t lse, uintptr_t grad_lse,
           const TensorArg& dq, const TensorArg& dk, const TensorArg& dv, float scale,
           int64_t causal_offset, const MaskArg& mask, uintptr_t key_lengths,
           const std::vector<int64_t>& pattern) {
          return attention_backward_cuda_workspace_size(
              backward_params(sizes, q, k, v, out, grad_out, lse, grad_lse, dq, dk, dv, scale,
                              causal_offset, mask, key_lengths, pattern));
        });
  m.def("attention_backward_cuda",
        [](const Sizes& sizes, const TensorArg& q, const TensorArg& k, const TensorArg& v,
           const TensorArg& out, const TensorArg& grad_out, uintptr_t lse, uintptr_t grad_lse,
           const TensorArg& dq, const TensorArg& dk, const TensorArg& dv, float scale,
           int64_t causal_offset, const MaskArg& mask, uintptr_t key_lengths,
           const std::vector<int64_t>& pattern, uintptr_t workspace, uintptr_t stream) {
          const AttnBackwardParams p =
              backward_params(sizes, q, k, v, out, grad_out, lse, grad_lse, dq, dk, dv, scale,
                              causal_offset, mask, key_lengths, pattern);
          py::gil_scoped_release release;
          attention_backward_cuda(p, reinterpret_cast<void*>(workspace), reinterpret_cast<void*>(stream));
        });
}

}  // namespace bindings
}  // namespace imgtx
