// C++ API of the discrete-diffusion family: VQ-Diffusion's mask-and-replace transitions.
//
// Math: docs/specs/mask_and_replace.md. K real classes, MASK = K. Every op works per token
// (O(K) work, O(1) state), so no (B, K+1, N) temporary exists anywhere.
//
// Framework-free: raw pointers, sizes, strides (in elements), and on CUDA a stream.
// Per-sample schedule values arrive as a (batch, kMrCoefs) float64 table (row b is the
// schedule at sample b's timestep, gathered by the caller), so the kernels never see `t` and a
// device-side gather keeps CUDA launches sync-free and graph-capturable.
#pragma once

#include <cstddef>
#include <cstdint>

#include "imgtx/dtype.h"

namespace imgtx {

// Columns of the per-sample coefficient table (float64):
//   one-step a, b, c at t; cumulative A, B, C at t; cumulative A', B', C' at t - 1
//   ((1, 0, 0) when t = 0); t_is_zero (1.0 or 0.0).
enum MrCoef : int {
  kMrA1 = 0, kMrB1, kMrC1,     // a_t, b_t, c_t
  kMrAc, kMrBc, kMrCc,         // A_t, B_t, C_t
  kMrAp, kMrBp, kMrCp,         // A_{t-1}, B_{t-1}, C_{t-1}
  kMrTZero,                    // 1 when t == 0
  kMrCoefs                     // row length
};

// log p(x0 | x_t) (or any per-token shift of it: the posterior is invariant), (batch, K, tokens)
// with arbitrary strides, so diffusers' (B, K, N) permuted views are read without a copy.
struct MrLogits {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t stride_batch = 0, stride_class = 0, stride_token = 0;
};

// An int64 (batch, tokens) index tensor with arbitrary strides.
struct MrIndices {
  const int64_t* data = nullptr;
  int64_t stride_batch = 0, stride_token = 0;
};

// Bits of the status word the kernels report (CPU: returned; CUDA: OR-ed into a device int).
enum MrStatus : int {
  kMrOk = 0,
  kMrBadLogits = 1,  // a token whose logits hold NaN/+Inf, or no finite value at all
  kMrBadIndex = 2,   // an x_t outside [0, K] or an x0 outside [0, K)
};

// ---- reverse step: p(x_{t-1} | x_t) -------------------------------------------------------
struct MrPosteriorParams {
  int64_t batch = 0, num_classes = 0, tokens = 0;  // num_classes = K (real classes)
  MrLogits logp;               // conditional (or only) log p(x0 | x_t)
  MrLogits logp_uncond;        // data == nullptr: no guidance
  float guidance_scale = 1.f;  // l = l_u + s (l_c - l_u) when logp_uncond is given
  float truncation_rate = 1.f; // top-r (spec); >= 1 keeps every class; 0 keeps only the
                               // first class (lowest index) with the largest float32 p
  MrIndices x_t;
  const double* coefs = nullptr;  // (batch, kMrCoefs)

  // Output: exactly one of the two.
  int64_t* x_prev = nullptr;  // (batch, tokens) contiguous: a sample of x_{t-1}
  float* log_probs = nullptr; // (batch, K + 1, tokens) normalised log-probabilities
  int64_t out_stride_batch = 0, out_stride_class = 0, out_stride_token = 0;

  // Philox key for sampling: one int64, host memory on CPU, device memory on CUDA. Token
  // (b, n) uses counter (b * tokens + n, kMrStreamPosterior), so results do not depend on
  // threads or blocks.
  const int64_t* seed = nullptr;
};

// ---- forward noising q(x_t | x0) ----------------------------------------------------------
struct MrQSampleParams {
  int64_t batch = 0, num_classes = 0, tokens = 0;
  MrIndices x0;
  const double* coefs = nullptr;  // (batch, kMrCoefs); uses A_t, B_t, C_t
  const int64_t* seed = nullptr;
  int64_t* x_t = nullptr;         // (batch, tokens) contiguous
};

// ---- training loss terms (per token) ------------------------------------------------------
// L_vb  = t == 0 ? -log p(x0 | x_t)[x0] : KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t))
// L_aux = -log softmax(logits)[x0]
// Inputs are raw logits (the kernel applies the log-softmax). The backward pass returns
// grad_logits = grad_vb * dL_vb/dlogits + grad_aux * dL_aux/dlogits, elementwise per token.
constexpr int kMrVbSaved = 6;  // float64 scalars saved per token for the backward pass
struct MrVbParams {
  int64_t batch = 0, num_classes = 0, tokens = 0;
  MrLogits logits;
  MrIndices x0, x_t;
  const double* coefs = nullptr;  // (batch, kMrCoefs)
  // forward outputs, (batch, tokens) contiguous
  float* loss_vb = nullptr;
  float* loss_aux = nullptr;
  double* saved = nullptr;        // (batch, tokens, kMrVbSaved)
  // backward inputs/outputs
  const float* grad_vb = nullptr;   // (batch, tokens) contiguous
  const float* grad_aux = nullptr;  // (batch, tokens) contiguous
  void* grad_logits = nullptr;      // logits' dtype, (batch, K, tokens) with the strides below
  int64_t grad_stride_batch = 0, grad_stride_class = 0, grad_stride_token = 0;
};

// Philox counter streams (the second counter word): different ops never share draws.
constexpr uint32_t kMrStreamPosterior = 1;
constexpr uint32_t kMrStreamQSample = 2;

// Throw std::invalid_argument on bad sizes/pointers (the Python layer checks first).
void validate(const MrPosteriorParams& p);
void validate(const MrQSampleParams& p);
void validate(const MrVbParams& p, bool backward);

// CPU: up to `num_threads` threads of the library's pool; extra memory O(threads * K).
// Return an MrStatus bit set (0 when every token was valid; tokens flagged bad get
// x_prev = -1 / NaN outputs).
int mr_posterior_cpu(const MrPosteriorParams& p, int num_threads);
int mr_q_sample_cpu(const MrQSampleParams& p, int num_threads);
int mr_vb_forward_cpu(const MrVbParams& p, int num_threads);
void mr_vb_backward_cpu(const MrVbParams& p, int num_threads);

// CUDA: device pointers, asynchronous on `stream`, no host syncs, capturable. `status` is a
// device int the kernels OR MrStatus bits into (the caller zeroes it and checks it lazily).
void mr_posterior_cuda(const MrPosteriorParams& p, int* status, void* stream);
void mr_q_sample_cuda(const MrQSampleParams& p, int* status, void* stream);
void mr_vb_forward_cuda(const MrVbParams& p, int* status, void* stream);
void mr_vb_backward_cuda(const MrVbParams& p, void* stream);

}  // namespace imgtx
