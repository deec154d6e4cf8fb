// Portable build (SSE2 on x86-64, NEON on aarch64): 4-wide vectors, the width of the baseline
// registers. (8-wide vectors are pairs of registers there: the micro-kernels' accumulators
// then spill, measured 4 GFLOP/s against 108 for AVX2.) Runs on any CPU.
#define IMGTX_CPU_NS portable
#include "attention/attention_cpu_backward.h"

namespace imgtx {

void attention_forward_cpu_portable(const AttnForwardParams& p, int num_threads) {
  portable::attn_cpu::attention_forward_driver<4>(p, num_threads);
}
void attention_backward_cpu_portable(const AttnBackwardParams& p, int num_threads) {
  portable::attn_cpu::attention_backward_driver<4>(p, num_threads);
}

}  // namespace imgtx
