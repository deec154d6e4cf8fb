// AVX2 + FMA: 8-wide vectors in ymm registers; chosen at run time when the CPU has AVX2.
#define IMGTX_CPU_NS avx2
#include "diffusion/diffusion_cpu_driver.h"

namespace imgtx {

int mr_posterior_cpu_avx2(const MrPosteriorParams& p, int num_threads) {
  return avx2::mr_posterior_driver<8>(p, num_threads);
}
int mr_vb_forward_cpu_avx2(const MrVbParams& p, int num_threads) {
  return avx2::mr_vb_forward_driver<8>(p, num_threads);
}
void mr_vb_backward_cpu_avx2(const MrVbParams& p, int num_threads) {
  avx2::mr_vb_backward_driver<8>(p, num_threads);
}

}  // namespace imgtx
