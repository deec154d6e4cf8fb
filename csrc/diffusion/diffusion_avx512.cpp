// AVX-512F: 16-wide vectors in zmm registers; chosen at run time when the CPU has AVX-512F.
#define IMGTX_CPU_NS avx512
#include "diffusion/diffusion_cpu_driver.h"

namespace imgtx {

int mr_posterior_cpu_avx512(const MrPosteriorParams& p, int num_threads) {
  return avx512::mr_posterior_driver<16>(p, num_threads);
}
int mr_vb_forward_cpu_avx512(const MrVbParams& p, int num_threads) {
  return avx512::mr_vb_forward_driver<16>(p, num_threads);
}
void mr_vb_backward_cpu_avx512(const MrVbParams& p, int num_threads) {
  avx512::mr_vb_backward_driver<16>(p, num_threads);
}

}  // namespace imgtx
