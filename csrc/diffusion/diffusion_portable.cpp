// Portable build (SSE2 on x86-64, NEON on aarch64): 8-wide vectors, run on any CPU.
#define IMGTX_CPU_NS portable
#include "diffusion/diffusion_cpu_driver.h"

namespace imgtx {

int mr_posterior_cpu_portable(const MrPosteriorParams& p, int num_threads) {
  return portable::mr_posterior_driver<8>(p, num_threads);
}
int mr_vb_forward_cpu_portable(const MrVbParams& p, int num_threads) {
  return portable::mr_vb_forward_driver<8>(p, num_threads);
}
void mr_vb_backward_cpu_portable(const MrVbParams& p, int num_threads) {
  portable::mr_vb_backward_driver<8>(p, num_threads);
}

}  // namespace imgtx
