// AVX-512F: 16-wide vectors in zmm registers; chosen at run time when the CPU has AVX-512F.
#define IMGTX_CPU_NS avx512
#include "attention/attention_cpu_backward.h"

namespace imgtx {

void attention_forward_cpu_avx512(const AttnForwardParams& p, int num_threads) {
  avx512::attn_cpu::attention_forward_driver<16>(p, num_threads);
}
void attention_backward_cpu_avx512(const AttnBackwardParams& p, int num_threads) {
  avx512::attn_cpu::attention_backward_driver<16>(p, num_threads);
}

}  // namespace imgtx
