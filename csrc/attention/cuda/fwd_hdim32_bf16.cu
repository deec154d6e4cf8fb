// One instantiation of the CUDA attention forward (see attention_cuda_fwd.cuh): one file per
// (head dim, dtype) so a kernel change rebuilds in parallel and little at a time.
#include "attention/attention_cuda_fwd.cuh"

namespace imgtx {
namespace attn_cuda {
template void launch_fwd<32, __nv_bfloat16>(const FwdArgs&, int64_t, cudaStream_t);
}  // namespace attn_cuda
}  // namespace imgtx
