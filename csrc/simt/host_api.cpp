// The CUDA runtime API subset our host entry points call, and the device atomics, under the
// emulator. One emulated device (0) with the properties of settings().arch. Everything is
// synchronous: a stream is only a token.
#include <map>
#include <mutex>

#include "cuda_runtime_api.h"
#include "simt/internal.h"

namespace simt {

int take_last_error(bool clear);

namespace {
std::mutex g_attr_mutex;
std::map<const void*, size_t>& attr_map() {
  static std::map<const void*, size_t> m;
  return m;
}
}  // namespace

size_t func_smem_optin(const void* func) {
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  auto it = attr_map().find(func);
  return it == attr_map().end() ? 0 : it->second;
}

cudaError_t func_set_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > smem_optin_limit(settings().arch)) return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    attr_map()[func] = size_t(value);
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout)
    return (value >= -1 && value <= 100) ? cudaSuccess : cudaErrorInvalidValue;
  return cudaErrorInvalidValue;
}

// Atomics: fibers switch only at synchronisation points, so a plain read-modify-write is atomic.
// Each counts as a read and a write of its bytes (count_atomic, race.cpp).
namespace {
template <class T, class Op>
T atomic_rmw(T* p, Op op) {
  count_atomic(p, sizeof(T));
  const T old = *p;
  *p = op(old);
  return old;
}
}  // namespace

float atomic_add(float* p, float v) { return atomic_rmw(p, [&](float o) { return o + v; }); }
double atomic_add(double* p, double v) { return atomic_rmw(p, [&](double o) { return o + v; }); }
int atomic_add(int* p, int v) {
  return atomic_rmw(p, [&](int o) { return int(unsigned(o) + unsigned(v)); });  // wraps like the GPU
}
unsigned atomic_add(unsigned* p, unsigned v) { return atomic_rmw(p, [&](unsigned o) { return o + v; }); }
unsigned long long atomic_add(unsigned long long* p, unsigned long long v) {
  return atomic_rmw(p, [&](unsigned long long o) { return o + v; });
}
unsigned atomic_or(unsigned* p, unsigned v) { return atomic_rmw(p, [&](unsigned o) { return o | v; }); }
int atomic_or(int* p, int v) { return atomic_rmw(p, [&](int o) { return o | v; }); }
unsigned long long atomic_max(unsigned long long* p, unsigned long long v) {
  return atomic_rmw(p, [&](unsigned long long o) { return v > o ? v : o; });
}
int atomic_max(int* p, int v) { return atomic_rmw(p, [&](int o) { return v > o ? v : o; }); }
unsigned atomic_max(unsigned* p, unsigned v) { return atomic_rmw(p, [&](unsigned o) { return v > o ? v : o; }); }
int atomic_min(int* p, int v) { return atomic_rmw(p, [&](int o) { return v < o ? v : o; }); }
unsigned atomic_cas(unsigned* p, unsigned cmp, unsigned v) {
  return atomic_rmw(p, [&](unsigned o) { return o == cmp ? v : o; });
}
unsigned long long atomic_cas(unsigned long long* p, unsigned long long cmp, unsigned long long v) {
  return atomic_rmw(p, [&](unsigned long long o) { return o == cmp ? v : o; });
}

}  // namespace simt

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    default: return "unknown error (emulated)";
  }
}
cudaError_t cudaGetLastError() { return cudaError_t(::simt::take_last_error(true)); }
cudaError_t cudaPeekAtLastError() { return cudaError_t(::simt::take_last_error(false)); }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  const int arch = ::simt::settings().arch;
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = arch == 90 ? 132 : 108; break;
    case cudaDevAttrComputeCapabilityMajor: *value = arch / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *value = arch % 10; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = ::simt::smem_optin_limit(arch); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  if (bytes && !p) return cudaErrorInvalidValue;
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
