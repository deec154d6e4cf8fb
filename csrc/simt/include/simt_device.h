// Device-side CUDA built-ins under the emulator: qualifiers, thread coordinates, barriers, warp
// shuffles and votes, atomics, bit casts and rounding intrinsics. Warp and block operations are
// rendezvous of the emulated threads (simt/runtime.cpp); the rest is plain host code.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "simt/simt.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __constant__ static

#define threadIdx (::simt::coords().thread_idx)
#define blockIdx (::simt::coords().block_idx)
#define blockDim (::simt::coords().block_dim)
#define gridDim (::simt::coords().grid_dim)
constexpr int warpSize = 32;

using std::isinf;
using std::isnan;

// ---- barriers --------------------------------------------------------------------------------
inline void __syncthreads(SIMT_SITE_ARGS) { ::simt::barrier(::simt::BarrierOp::kPlain, 1, SIMT_SITE); }
inline int __syncthreads_and(int p, SIMT_SITE_ARGS) {
  return ::simt::barrier(::simt::BarrierOp::kAnd, p != 0, SIMT_SITE);
}
inline int __syncthreads_or(int p, SIMT_SITE_ARGS) {
  return ::simt::barrier(::simt::BarrierOp::kOr, p != 0, SIMT_SITE);
}
inline int __syncthreads_count(int p, SIMT_SITE_ARGS) {
  return ::simt::barrier(::simt::BarrierOp::kCount, p != 0, SIMT_SITE);
}

// ---- warp collectives ------------------------------------------------------------------------
namespace simt {

// shfl.sync with PTX's (b, c) operands: mode 0 idx, 1 up, 2 down, 3 bfly. Out of line (like
// the votes), so the race detector and the traffic counters see only the kernel's own accesses.
uint64_t shfl_bits(unsigned mask, uint64_t bits, int mode, int b, int width, const char* kind, Site site);
uint64_t vote(unsigned mask, int pred, const char* kind, Site site);
template <class T>
T shfl(unsigned mask, T v, int mode, int b, int width, const char* kind, Site site) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle type");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl_bits(mask, bits, mode, b, width, kind, site);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
}  // namespace simt

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32, SIMT_SITE_ARGS) {
  return ::simt::shfl(mask, v, 0, src, width, "__shfl_sync", SIMT_SITE);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, SIMT_SITE_ARGS) {
  return ::simt::shfl(mask, v, 1, int(delta), width, "__shfl_up_sync", SIMT_SITE);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, SIMT_SITE_ARGS) {
  return ::simt::shfl(mask, v, 2, int(delta), width, "__shfl_down_sync", SIMT_SITE);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, SIMT_SITE_ARGS) {
  return ::simt::shfl(mask, v, 3, lane_mask, width, "__shfl_xor_sync", SIMT_SITE);
}
inline unsigned __ballot_sync(unsigned mask, int pred, SIMT_SITE_ARGS) {
  return unsigned(::simt::vote(mask, pred, "__ballot_sync", SIMT_SITE));
}
inline int __all_sync(unsigned mask, int pred, SIMT_SITE_ARGS) {
  return ::simt::vote(mask, pred, "__all_sync", SIMT_SITE) == mask;
}
inline int __any_sync(unsigned mask, int pred, SIMT_SITE_ARGS) {
  return ::simt::vote(mask, pred, "__any_sync", SIMT_SITE) != 0;
}
inline void __syncwarp(unsigned mask = 0xffffffffu, SIMT_SITE_ARGS) {
  ::simt::vote(mask, 1, "__syncwarp", SIMT_SITE);
}

// ---- atomics (out of line: the race detector does not see them as plain accesses) -----------
namespace simt {
float atomic_add(float* p, float v);
double atomic_add(double* p, double v);
int atomic_add(int* p, int v);
unsigned atomic_add(unsigned* p, unsigned v);
unsigned long long atomic_add(unsigned long long* p, unsigned long long v);
unsigned atomic_or(unsigned* p, unsigned v);
int atomic_or(int* p, int v);
unsigned long long atomic_max(unsigned long long* p, unsigned long long v);
int atomic_max(int* p, int v);
unsigned atomic_max(unsigned* p, unsigned v);
int atomic_min(int* p, int v);
unsigned atomic_cas(unsigned* p, unsigned cmp, unsigned v);
unsigned long long atomic_cas(unsigned long long* p, unsigned long long cmp, unsigned long long v);
}  // namespace simt
template <class T, class V>
T atomicAdd(T* p, V v) { return ::simt::atomic_add(p, T(v)); }
template <class T, class V>
T atomicOr(T* p, V v) { return ::simt::atomic_or(p, T(v)); }
template <class T, class V>
T atomicMax(T* p, V v) { return ::simt::atomic_max(p, T(v)); }
template <class T, class V>
T atomicMin(T* p, V v) { return ::simt::atomic_min(p, T(v)); }
template <class T, class V>
T atomicCAS(T* p, V cmp, V v) { return ::simt::atomic_cas(p, T(cmp), T(v)); }

// ---- loads, bit casts, integer and rounding intrinsics ---------------------------------------
template <class T>
inline T __ldg(const T* p) { return *p; }

namespace simt {
template <class To, class From>
inline To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast");
  To r;
  std::memcpy(&r, &v, sizeof(To));
  return r;
}
}  // namespace simt
inline unsigned __float_as_uint(float v) { return ::simt::bit_cast<unsigned>(v); }
inline int __float_as_int(float v) { return ::simt::bit_cast<int>(v); }
inline float __uint_as_float(unsigned v) { return ::simt::bit_cast<float>(v); }
inline float __int_as_float(int v) { return ::simt::bit_cast<float>(v); }
inline long long __double_as_longlong(double v) { return ::simt::bit_cast<long long>(v); }
inline double __longlong_as_double(long long v) { return ::simt::bit_cast<double>(v); }
inline double __hiloint2double(int hi, int lo) {
  return ::simt::bit_cast<double>((uint64_t(uint32_t(hi)) << 32) | uint32_t(lo));
}
inline int __double2hiint(double v) { return int(::simt::bit_cast<uint64_t>(v) >> 32); }
inline int __double2loint(double v) { return int(uint32_t(::simt::bit_cast<uint64_t>(v))); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }

// The host compiler builds these files with -ffp-contract=off, so each is one rounding.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __double2float_rn(double a) { return float(a); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : (a == a ? a : 0.f)); }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float exp10f(float a) { return powf(10.f, a); }

// CUDA's global min/max overloads for mixed integer arguments.
template <class A, class B,
          class = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
inline typename std::common_type<A, B>::type min(A a, B b) {
  typedef typename std::common_type<A, B>::type C;
  return C(a) < C(b) ? C(a) : C(b);
}
template <class A, class B,
          class = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
inline typename std::common_type<A, B>::type max(A a, B b) {
  typedef typename std::common_type<A, B>::type C;
  return C(a) < C(b) ? C(b) : C(a);
}


// ---- shared memory declarations and launches (used through csrc/common/cuda_kernel.cuh) -----
namespace simt {
template <class T>
using type_identity_t = T;

template <class... P>
struct Launcher {
  void (*kernel)(P...);
  LaunchConfig cfg;
  template <class... A>
  void operator()(A&&... args) const {
    // The parameters are converted once, like the launch's parameter buffer; every thread then
    // receives its own copy (kernel parameters are by value).
    std::tuple<typename std::decay<P>::type...> params(std::forward<A>(args)...);
    struct Closure {
      void (*kernel)(P...);
      std::tuple<typename std::decay<P>::type...>* params;
    } closure{kernel, &params};
    LaunchConfig c = cfg;
    c.func = reinterpret_cast<const void*>(kernel);
    c.params = &params;  // reads of it are parameter loads, not global memory traffic
    c.params_bytes = sizeof(params);
    const int err = run(c, [](void* p) {
      Closure* cl = static_cast<Closure*>(p);
      std::apply(cl->kernel, *cl->params);
    }, &closure);
    (void)err;  // recorded as the sticky launch error (cudaGetLastError)
  }
};
template <class... P>
Launcher<P...> launcher(void (*kernel)(P...), const LaunchConfig& cfg) {
  return Launcher<P...>{kernel, cfg};
}
}  // namespace simt

#define SIMT_LAUNCH(grid, block, smem, stream, ...)                                           \
  ::simt::launcher(__VA_ARGS__, ::simt::LaunchConfig{#__VA_ARGS__, __FILE__, __LINE__,       \
                                                     dim3(grid), dim3(block), size_t(smem), nullptr,  \
                                                     nullptr, 0})
#define SIMT_SHARED(type, name)                                                                \
  static const ::simt::SharedSite name##_simt_site{sizeof(::simt::type_identity_t<type>), 16, \
                                                  #name, __FILE__, __LINE__};                 \
  ::simt::type_identity_t<type>& name =                                                       \
      *static_cast<::simt::type_identity_t<type>*>(::simt::static_shared(name##_simt_site))
#define SIMT_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::simt::dynamic_shared())
