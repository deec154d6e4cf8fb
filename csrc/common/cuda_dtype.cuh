// Element access for CUDA kernels: raw fp32/fp16/bf16 bits -> fp32, fp32 -> the dtype as
// written, and a host-side dispatch over DType. Shared by every kernel family's .cu file.
//
// Loads use the read-only path (ld.global.nc): kernels only load their inputs through these,
// never a buffer they write, and the compiler may then batch the loads ahead of stores.
// Stores round to nearest even; NaN gets the bits imgtx::float_to_half_bits /
// float_to_bf16_bits give on the CPU, so CPU and GPU outputs are identical.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "imgtx/dtype.h"

namespace imgtx {

struct F32 {
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __ldg(static_cast<const float*>(p) + i);
  }
  static __device__ __forceinline__ float round(float v) { return v; }
  static __device__ __forceinline__ float store(void* p, int64_t i, float v) {
    static_cast<float*>(p)[i] = v;
    return v;
  }
};

struct F16 {
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(p) + i)));
  }
  static __device__ __forceinline__ unsigned short bits(float v) {
    if (isnan(v)) return (unsigned short)(((__float_as_uint(v) >> 16) & 0x8000u) | 0x7e00u);
    return __half_as_ushort(__float2half_rn(v));
  }
  static __device__ __forceinline__ float round(float v) {
    return __half2float(__ushort_as_half(bits(v)));
  }
  static __device__ __forceinline__ float store(void* p, int64_t i, float v) {
    const unsigned short b = bits(v);
    static_cast<unsigned short*>(p)[i] = b;
    return __half2float(__ushort_as_half(b));
  }
};

struct BF16 {
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __uint_as_float(uint32_t(__ldg(static_cast<const unsigned short*>(p) + i)) << 16);
  }
  static __device__ __forceinline__ unsigned short bits(float v) {  // payload kept, quiet bit set
    if (isnan(v)) return (unsigned short)((__float_as_uint(v) >> 16) | 0x40u);
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  static __device__ __forceinline__ float round(float v) {
    return __uint_as_float(uint32_t(bits(v)) << 16);
  }
  static __device__ __forceinline__ float store(void* p, int64_t i, float v) {
    const unsigned short b = bits(v);
    static_cast<unsigned short*>(p)[i] = b;
    return __uint_as_float(uint32_t(b) << 16);
  }
};

// A load whose dtype is a run-time value (a uniform branch), for a kernel's second input.
__device__ __forceinline__ float load_any(DType t, const void* p, int64_t i) {
  switch (t) {
    case DType::kFloat16: return F16::load(p, i);
    case DType::kBFloat16: return BF16::load(p, i);
    default: return F32::load(p, i);
  }
}

// fn(F32{}), fn(F16{}) or fn(BF16{}): instantiates a launch once per element type.
template <class Fn>
void dispatch_dtype(DType t, Fn&& fn) {
  switch (t) {
    case DType::kFloat16: fn(F16{}); break;
    case DType::kBFloat16: fn(BF16{}); break;
    default: fn(F32{});
  }
}

}  // namespace imgtx
