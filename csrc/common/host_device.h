// IMGTX_HD: inline helpers shared by host code and CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define IMGTX_HD __host__ __device__ __forceinline__
#else
#define IMGTX_HD inline
#endif
