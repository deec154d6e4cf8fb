// C++ API of the fused attention family (flash-style, fp32 math).
//
// Framework-free: raw pointers, sizes, strides (in elements; the head dim is contiguous).
// Semantics (docs/specs/local_attention.md for the patterns):
//   out[b,h,i] = sum_j softmax_j(s_ij) v[b,g,j],  s_ij = scale * q[b,h,i] . k[b,g,j] + mask_ij
//   with g = h / (heads / kv_heads) (GQA/MQA). Only visible keys take part; a key is visible iff
//   - j < key_lengths[b] (when key_lengths is given), and
//   - j <= i + causal_offset (when causal), and
//   - the pattern lets query position p = i + (k_len - q_len) see key j, and
//   - the boolean mask (when given) is true.
//   A query with no visible key gets out = 0 and lse = kLseEmpty; its gradients are 0.
//   lse[b,h,i] = log(sum over visible j of exp(s_ij)) (natural log), fp32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>

#include "imgtx/dtype.h"

namespace imgtx {

// The log-sum-exp of a query that sees no key: finite, and -inf-like for merging partials.
constexpr float kLseEmpty = -std::numeric_limits<float>::max();
constexpr int kAttnMaxHeadDim = 256;

// A (batch, heads, rows, dim) operand with the dim axis contiguous.
struct AttnTensor {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t stride_batch = 0, stride_head = 0, stride_row = 0;
};
struct AttnOutput {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t stride_batch = 0, stride_head = 0, stride_row = 0;
};

enum class AttnMaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };
// A mask indexed [b, h, i, j] through strides (0 for broadcast dims). kBool: one byte per
// element, nonzero = visible. kAdditive: added to the scaled scores, in `dtype`.
struct AttnMask {
  const void* data = nullptr;
  AttnMaskKind kind = AttnMaskKind::kNone;
  DType dtype = DType::kFloat32;
  int64_t stride_batch = 0, stride_head = 0, stride_q = 0, stride_k = 0;
};

enum class AttnPatternKind : int { kDense = 0, kLocal1d = 1, kLocal2d = 2 };
struct AttnPattern {
  AttnPatternKind kind = AttnPatternKind::kDense;
  bool causal = false;
  int64_t block = 0, filter_width = 0;                   // Local1d
  int64_t height = 0, width = 0;                         // Local2d image
  int64_t query_h = 0, query_w = 0, flange_h = 0, flange_w = 0;
};

struct AttnParams {
  int64_t batch = 0, heads = 0, kv_heads = 0, q_len = 0, k_len = 0, head_dim = 0, v_dim = 0;
  AttnTensor q, k, v;          // all three share a dtype
  float scale = 1.0f;
  bool causal = false;
  int64_t causal_offset = 0;   // query i sees keys j <= i + causal_offset (when causal)
  const int64_t* key_lengths = nullptr;  // (batch) or null
  AttnMask mask;
  AttnPattern pattern;
};

struct AttnForwardParams : AttnParams {
  AttnOutput out;              // (batch, heads, q_len, v_dim) in q's dtype
  float* lse = nullptr;        // (batch, heads, q_len) contiguous, may be null
};

struct AttnBackwardParams : AttnParams {
  AttnTensor out, grad_out;    // the forward's output and its gradient, in q's dtype
  const float* lse = nullptr;  // the forward's lse, (batch, heads, q_len) contiguous
  const float* grad_lse = nullptr;  // gradient of lse, same layout, or null (zero)
  AttnOutput grad_q, grad_k, grad_v;  // written (not accumulated), in the inputs' dtype
};

// Throw std::invalid_argument on bad sizes or pattern parameters (the Python layer checks
// first; this is the last line of defence for callers of the C++ API).
void validate(const AttnParams& p);

// CPU: up to `num_threads` threads of the library's pool. Extra memory: O(threads * tile)
// in the forward; the backward adds fp32 dK/dV accumulators for the kv heads in flight.
void attention_forward_cpu(const AttnForwardParams& p, int num_threads);
void attention_backward_cpu(const AttnBackwardParams& p, int num_threads);

// CUDA (issue 5; compiled, not yet verified on a GPU): tensor-core kernels for fp16/bf16 inputs
// with D == Dv in {32, 64, 96, 128}; attention_cuda_supported says whether a call qualifies for
// the given pass (the backward needs more shared memory than the forward: at D = 128 only the
// forward fits the 99 KB per block of sm_86/sm_89).
// Every pointer (q, k, v, out, lse, key_lengths, mask, gradients) is a device pointer;
// `workspace` is a device buffer of at least the *_workspace_size bytes, 256-byte aligned,
// allocated by the caller (so it comes from the framework's caching allocator). Asynchronous on
// `stream` (a cudaStream_t); launch errors throw std::runtime_error; no host synchronisation, so
// the calls can be captured in a CUDA graph. Semantics identical to the CPU functions.
enum class AttnPass : int { kForward = 0, kBackward = 1 };
bool attention_cuda_supported(const AttnParams& p, AttnPass pass);
size_t attention_forward_cuda_workspace_size(const AttnForwardParams& p);
void attention_forward_cuda(const AttnForwardParams& p, void* workspace, void* stream);
size_t attention_backward_cuda_workspace_size(const AttnBackwardParams& p);
void attention_backward_cuda(const AttnBackwardParams& p, void* workspace, void* stream);

}  // namespace imgtx
