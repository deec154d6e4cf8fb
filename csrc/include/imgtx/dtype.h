// Element types understood by every kernel family, and their host-side conversions.
#pragma once

#include <cstdint>
#include <cstring>

namespace imgtx {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// IEEE binary16 <-> binary32, exact in the widening direction, round-to-nearest-even narrowing.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: renormalise
    exp = 113;
    while ((man & 0x400u) == 0) { man <<= 1; --exp; }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: overflow
  if (ax < 0x38800000u) {                                   // result is subnormal or zero
    if (ax < 0x33000000u) return sign;                      // < 2^-25 rounds to zero
    const uint32_t e = ax >> 23;
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = ((ax >> 13) - (112u << 10));
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return uint16_t(sign | r);
}

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

// out[i] = float(base[offset + i * stride]) for i < count; the dtype switch sits outside the loop.
inline void load_strided_as_float(const void* base, int64_t offset, int64_t stride, int64_t count,
                                  DType t, float* out) {
  switch (t) {
    case DType::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < count; ++i) out[i] = half_bits_to_float(src[i * stride]);
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < count; ++i) out[i] = bf16_bits_to_float(src[i * stride]);
      break;
    }
    default: {
      const float* src = static_cast<const float*>(base) + offset;
      for (int64_t i = 0; i < count; ++i) out[i] = src[i * stride];
    }
  }
}

// The value v takes once stored in dtype t (round to nearest even), as a float.
inline float round_to_dtype(float v, DType t) {
  switch (t) {
    case DType::kFloat16: return half_bits_to_float(float_to_half_bits(v));
    case DType::kBFloat16: return bf16_bits_to_float(float_to_bf16_bits(v));
    default: return v;
  }
}

// base[offset + i] = v[i] in dtype t (round to nearest even, contiguous destination), and
// v[i] becomes the value as stored: one conversion per element serves both.
inline void store_rounded_as_dtype(void* base, int64_t offset, float* v, int64_t count,
                                   DType t) {
  switch (t) {
    case DType::kFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < count; ++i) {
        dst[i] = float_to_half_bits(v[i]);
        v[i] = half_bits_to_float(dst[i]);
      }
      break;
    }
    case DType::kBFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < count; ++i) {
        dst[i] = float_to_bf16_bits(v[i]);
        v[i] = bf16_bits_to_float(dst[i]);
      }
      break;
    }
    default: std::memcpy(static_cast<float*>(base) + offset, v, size_t(count) * sizeof(float));
  }
}

// v[i] = the value v[i] takes once stored in dtype t.
inline void round_to_dtype_inplace(float* v, int64_t count, DType t) {
  if (t == DType::kFloat32) return;
  for (int64_t i = 0; i < count; ++i) v[i] = round_to_dtype(v[i], t);
}

}  // namespace imgtx
