// Stand-in for cuda_fp16.h under the emulator: __half storage and its conversions, rounded to
// nearest even bit for bit like the GPU's cvt.rn.f16.f32 (NaN becomes the canonical 0x7fff).
#pragma once

#include "simt/float16.h"

struct __half {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;
};

inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __float2half_rn(float v) { return __half{::simt::f32_to_f16_bits(v)}; }
inline __half __float2half(float v) { return __float2half_rn(v); }
inline float __half2float(__half h) { return ::simt::f16_bits_to_f32(h.__x); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
