// Linked instead of attention_cuda.cu (and the kernels in cuda/) when the extension is built
// without CUDA: nothing qualifies for the CUDA path, and calling it anyway is an error.
#include <stdexcept>

#include "imgtx/attention.h"

namespace imgtx {

namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "imgtx_fast was built without CUDA; rebuild with nvcc on PATH (IMGTX_FAST_CUDA=1)");
}
}  // namespace

bool attention_cuda_supported(const AttnParams&, AttnPass) { return false; }
size_t attention_forward_cuda_workspace_size(const AttnForwardParams&) { return 0; }
void attention_forward_cuda(const AttnForwardParams&, void*, void*) { no_cuda(); }
size_t attention_backward_cuda_workspace_size(const AttnBackwardParams&) { return 0; }
void attention_backward_cuda(const AttnBackwardParams&, void*, void*) { no_cuda(); }

}  // namespace imgtx
