// Built instead of diffusion_cuda.cu when CUDA is off: the entry points exist so the bindings
// link, and say why they cannot run.
#include <stdexcept>

#include "imgtx/diffusion.h"

namespace imgtx {
namespace {
[[noreturn]] void no_cuda() { throw std::runtime_error("imgtx_fast was built without CUDA"); }
}  // namespace

void mr_posterior_cuda(const MrPosteriorParams&, int*, void*) { no_cuda(); }
void mr_q_sample_cuda(const MrQSampleParams&, int*, void*) { no_cuda(); }
void mr_vb_forward_cuda(const MrVbParams&, int*, void*) { no_cuda(); }
void mr_vb_backward_cuda(const MrVbParams&, void*) { no_cuda(); }

}  // namespace imgtx
