// AVX2 + FMA: 8-wide vectors in ymm registers; chosen at run time when the CPU has AVX2 and FMA.
#define IMGTX_CPU_NS avx2
#include "attention/attention_cpu_backward.h"

namespace imgtx {

void attention_forward_cpu_avx2(const AttnForwardParams& p, int num_threads) {
  avx2::attn_cpu::attention_forward_driver<8>(p, num_threads);
}
void attention_backward_cpu_avx2(const AttnBackwardParams& p, int num_threads) {
  avx2::attn_cpu::attention_backward_driver<8>(p, num_threads);
}

}  // namespace imgtx
