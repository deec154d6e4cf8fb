// CPU mask-and-replace diffusion: argument checks, ISA dispatch, and q_sample (a few scalar
// operations per token, not worth a SIMD driver).
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cpu_features.h"
#include "common/philox.h"
#include "common/thread_pool.h"
#include "diffusion/diffusion_cpu_internal.h"
#include "diffusion/mr_token_math.h"
#include "imgtx/diffusion.h"

namespace imgtx {
namespace {

void fail(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string(op) + ": " + what);
}

void check_sizes(const char* op, int64_t batch, int64_t K, int64_t tokens) {
  if (batch < 0 || tokens < 0) fail(op, "batch and tokens must be >= 0");
  if (K < 1) fail(op, "num_classes must be >= 1");
  if (K > (int64_t(1) << 30)) fail(op, "num_classes must be <= 2^30");
}

void check_logits(const char* op, const char* name, const MrLogits& L) {
  if (!L.data) fail(op, std::string(name) + " is null");
  if (int(L.dtype) < 0 || int(L.dtype) > 2) fail(op, std::string(name) + " has a bad dtype");
}

}  // namespace

void validate(const MrPosteriorParams& p) {
  const char* op = "mr_posterior";
  check_sizes(op, p.batch, p.num_classes, p.tokens);
  if (p.batch * p.tokens == 0) return;
  check_logits(op, "logp", p.logp);
  if (p.logp_uncond.data) check_logits(op, "logp_uncond", p.logp_uncond);
  if (!p.x_t.data) fail(op, "x_t is null");
  if (!p.coefs) fail(op, "coefs is null");
  if ((p.x_prev == nullptr) == (p.log_probs == nullptr))
    fail(op, "exactly one of x_prev and log_probs must be given");
  if (p.x_prev && !p.seed) fail(op, "sampling needs a seed");
  if (!(p.truncation_rate >= 0.f)) fail(op, "truncation_rate must be >= 0");
}

void validate(const MrQSampleParams& p) {
  const char* op = "mr_q_sample";
  check_sizes(op, p.batch, p.num_classes, p.tokens);
  if (p.batch * p.tokens == 0) return;
  if (!p.x0.data || !p.coefs || !p.seed || !p.x_t) fail(op, "null pointer argument");
}

void validate(const MrVbParams& p, bool backward) {
  const char* op = backward ? "mr_vb_backward" : "mr_vb_forward";
  check_sizes(op, p.batch, p.num_classes, p.tokens);
  if (p.batch * p.tokens == 0) return;
  check_logits(op, "logits", p.logits);
  if (!p.x0.data || !p.x_t.data || !p.coefs || !p.saved) fail(op, "null pointer argument");
  if (!backward && (!p.loss_vb || !p.loss_aux)) fail(op, "loss outputs are null");
  if (backward && !p.grad_logits) fail(op, "grad_logits is null");
}

int mr_posterior_cpu(const MrPosteriorParams& p, int num_threads) {
  validate(p);
  if (p.batch * p.tokens == 0) return kMrOk;
  switch (active_cpu_isa()) {
#ifdef IMGTX_HAVE_X86_KERNELS
    case CpuIsa::kAvx512: return mr_posterior_cpu_avx512(p, num_threads);
    case CpuIsa::kAvx2: return mr_posterior_cpu_avx2(p, num_threads);
#endif
    default: return mr_posterior_cpu_portable(p, num_threads);
  }
}

int mr_vb_forward_cpu(const MrVbParams& p, int num_threads) {
  validate(p, false);
  if (p.batch * p.tokens == 0) return kMrOk;
  switch (active_cpu_isa()) {
#ifdef IMGTX_HAVE_X86_KERNELS
    case CpuIsa::kAvx512: return mr_vb_forward_cpu_avx512(p, num_threads);
    case CpuIsa::kAvx2: return mr_vb_forward_cpu_avx2(p, num_threads);
#endif
    default: return mr_vb_forward_cpu_portable(p, num_threads);
  }
}

void mr_vb_backward_cpu(const MrVbParams& p, int num_threads) {
  validate(p, true);
  if (p.batch * p.tokens == 0) return;
  switch (active_cpu_isa()) {
#ifdef IMGTX_HAVE_X86_KERNELS
    case CpuIsa::kAvx512: return mr_vb_backward_cpu_avx512(p, num_threads);
    case CpuIsa::kAvx2: return mr_vb_backward_cpu_avx2(p, num_threads);
#endif
    default: return mr_vb_backward_cpu_portable(p, num_threads);
  }
}

// One Philox draw and mr::q_sample_token per token.
int mr_q_sample_cpu(const MrQSampleParams& p, int num_threads) {
  validate(p);
  const int64_t K = p.num_classes, N = p.tokens;
  if (p.batch * N == 0) return kMrOk;
  const uint64_t seed = uint64_t(*p.seed);
  constexpr int64_t kPerTask = 4096;
  const int64_t total = p.batch * N, tasks = (total + kPerTask - 1) / kPerTask;
  std::atomic<int> status{0};
  parallel_for(tasks, num_threads, [&](int64_t task, int) {
    const int64_t end = (task + 1) * kPerTask < total ? (task + 1) * kPerTask : total;
    int local = 0;
    for (int64_t i = task * kPerTask; i < end; ++i) {
      const int64_t b = i / N, n = i % N;
      const int64_t x0 = p.x0.data[b * p.x0.stride_batch + n * p.x0.stride_token];
      if (x0 < 0 || x0 >= K) {
        p.x_t[i] = -1;
        local |= kMrBadIndex;
        continue;
      }
      const double* c = p.coefs + b * kMrCoefs;
      double u0, u1;
      philox_uniform2(seed, uint64_t(i), kMrStreamQSample, &u0, &u1);
      p.x_t[i] = mr::q_sample_token(c, x0, K, u0, u1);
    }
    if (local) status.fetch_or(local, std::memory_order_relaxed);
  });
  return status.load();
}

}  // namespace imgtx
