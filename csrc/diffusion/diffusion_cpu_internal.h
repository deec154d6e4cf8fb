// Pieces of the CPU mask-and-replace kernels shared by every ISA-specific driver.
#pragma once

#include <cstdint>

#include "imgtx/diffusion.h"

namespace imgtx {

// K rounded up to a multiple of the SIMD width: scratch rows are padded with -inf logits
// (p = 0), so the vector loops need no scalar tails.
inline int64_t padded(int64_t K, int W) { return (K + W - 1) / W * W; }

// Tokens per task: small enough that every thread gets several tasks (load balance), large
// enough that the per-task overhead (one pool hand-off) stays far below the per-token work.
inline int64_t tokens_per_task(int64_t batch, int64_t tokens, int num_threads) {
  const int64_t want_tasks = int64_t(num_threads) * 8;
  int64_t per = (batch * tokens + want_tasks - 1) / want_tasks;
  if (per < 1) per = 1;
  if (per > 64) per = 64;
  return per < tokens ? per : tokens;
}

// The ISA-specific entry points (diffusion_portable.cpp, diffusion_avx2.cpp,
// diffusion_avx512.cpp); argument checks happen before (diffusion_cpu.cpp).
int mr_posterior_cpu_portable(const MrPosteriorParams& p, int num_threads);
int mr_posterior_cpu_avx2(const MrPosteriorParams& p, int num_threads);
int mr_posterior_cpu_avx512(const MrPosteriorParams& p, int num_threads);
int mr_vb_forward_cpu_portable(const MrVbParams& p, int num_threads);
int mr_vb_forward_cpu_avx2(const MrVbParams& p, int num_threads);
int mr_vb_forward_cpu_avx512(const MrVbParams& p, int num_threads);
void mr_vb_backward_cpu_portable(const MrVbParams& p, int num_threads);
void mr_vb_backward_cpu_avx2(const MrVbParams& p, int num_threads);
void mr_vb_backward_cpu_avx512(const MrVbParams& p, int num_threads);

}  // namespace imgtx
