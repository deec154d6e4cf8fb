// Error checking for CUDA runtime calls and kernel launches: failures become std::runtime_error
// (so they surface as Python exceptions through the bindings) instead of aborting the process.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace imgtx {

inline void cuda_check(cudaError_t err, const char* expr, const char* file, int line) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + expr +
                             " failed: " + cudaGetErrorString(err));
}

// Call right after a <<<...>>> launch: reports bad configurations (grid, shared memory, ...).
// Errors raised while the kernel runs are asynchronous and show up at the next synchronizing call.
inline void check_last_launch(const char* kernel_name) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA launch of ") + kernel_name +
                             " failed: " + cudaGetErrorString(err));
}

}  // namespace imgtx

#define IMGTX_CUDA_CHECK(expr) ::imgtx::cuda_check((expr), #expr, __FILE__, __LINE__)
