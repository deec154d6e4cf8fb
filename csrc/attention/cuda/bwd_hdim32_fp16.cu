// One instantiation of the CUDA attention backward (see attention_cuda_bwd.cuh): one file per
// (head dim, dtype) so a kernel change rebuilds in parallel and little at a time.
#include "attention/attention_cuda_bwd.cuh"

namespace imgtx {
namespace attn_cuda {
template void launch_bwd<32, __half>(const BwdArgs&, int64_t, cudaStream_t);
}  // namespace attn_cuda
}  // namespace imgtx
