// Linked instead of codebook_cuda.cu when the extension is built without CUDA.
#include <stdexcept>

#include "imgtx/codebook.h"

namespace imgtx {

size_t codebook_lookup_cuda_workspace_size(const CodebookLookupParams&) { return 0; }

void codebook_lookup_cuda(const CodebookLookupParams&, void*, void*) {
  throw std::runtime_error(
      "imgtx_fast was built without CUDA; rebuild with nvcc on PATH (IMGTX_FAST_CUDA=1)");
}

}  // namespace imgtx
