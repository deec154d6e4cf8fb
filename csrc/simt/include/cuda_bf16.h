// Stand-in for cuda_bf16.h under the emulator: __nv_bfloat16 storage and its conversions, rounded
// to nearest even bit for bit like the GPU's cvt.rn.bf16.f32 (NaN becomes the canonical 0x7fff).
#pragma once

#include "simt/float16.h"

struct __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16{::simt::f32_to_bf16_bits(v)}; }
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }
inline float __bfloat162float(__nv_bfloat16 h) { return ::simt::bf16_bits_to_f32(h.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
