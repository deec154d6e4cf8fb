// How kernels declare shared memory and are launched: one macro each, so that the same source
// compiles with nvcc and, on the host compiler, against the emulator (csrc/simt), which gives
// every block its own exactly-sized, poisoned shared allocations and runs the launch itself.
//
//   IMGTX_SHARED(float[2][64], tile);         // __shared__ __align__(16) float tile[2][64];
//   IMGTX_DYNAMIC_SHARED(unsigned char, raw);  // extern __shared__ __align__(16) unsigned char raw[];
//   IMGTX_LAUNCH(grid, block, smem, stream, kernel<T, 4>)(args...);  // kernel<T, 4><<<...>>>(args...)
//
// And one host helper: copy_to_host_sync, a synchronising read-back of device memory (debug
// statistics; never on a path that must stay asynchronous or capturable in a CUDA graph).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstring>

#if defined(IMGTX_SIMT)
#define IMGTX_SHARED(type, name) SIMT_SHARED(type, name)
#define IMGTX_DYNAMIC_SHARED(type, name) SIMT_DYNAMIC_SHARED(type, name)
#define IMGTX_LAUNCH(grid, block, smem, stream, ...) SIMT_LAUNCH(grid, block, smem, stream, __VA_ARGS__)
#else
namespace imgtx {
template <class T>
using shared_type = T;  // lets IMGTX_SHARED take an array type: shared_type<float[2][64]> name
}
#define IMGTX_SHARED(type, name) __shared__ __align__(16) ::imgtx::shared_type<type> name
#define IMGTX_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#define IMGTX_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace imgtx {
// Copies `bytes` of device memory to the host once the work queued on `stream` has run.
inline cudaError_t copy_to_host_sync(void* dst, const void* src, size_t bytes,
                                     cudaStream_t stream) {
#if defined(IMGTX_SIMT)
  (void)stream;  // the emulator's launches are synchronous and its device memory is host memory
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
#else
  const cudaError_t err = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream);
  return err != cudaSuccess ? err : cudaStreamSynchronize(stream);
#endif
}
}  // namespace imgtx
