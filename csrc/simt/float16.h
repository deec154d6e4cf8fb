// fp16 and bf16 conversions of the emulated GPU, written from IEEE 754 (round to nearest, ties
// to even; subnormals kept; overflow to infinity) so they are exact on any host. NaN converts to
// the canonical NaN 0x7fff, as the GPU's cvt does. Checked on all 65536 patterns in
// tests/test_simt_emulator.py.
#pragma once

#include <cstdint>
#include <cstring>

namespace simt {

inline uint32_t f32_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return b;
}
inline float bits_f32(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}

inline unsigned short f32_to_f16_bits(float v) {
  const uint32_t x = f32_bits(v);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;                  // NaN
  if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520: inf
  if (ax >= 0x38800000u) {                                // normal half
    uint32_t h = (ax >> 13) - (112u << 10);
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return (unsigned short)(sign | h);
  }
  const uint32_t e = ax >> 23;  // subnormal half (or zero): units of 2^-24
  const uint32_t shift = 126u - e;
  if (shift > 24u) return (unsigned short)sign;
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  uint32_t r = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return (unsigned short)(sign | r);
}

inline float f16_bits_to_f32(unsigned short h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return bits_f32(sign | 0x7f800000u | (m << 13));
  if (e != 0) return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
  if (m == 0) return bits_f32(sign);
  const float mag = float(m) * (1.0f / 16777216.0f);  // m * 2^-24, exact
  return sign ? -mag : mag;
}

inline unsigned short f32_to_bf16_bits(float v) {
  const uint32_t x = f32_bits(v);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
  return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_f32(unsigned short h) { return bits_f32(uint32_t(h) << 16); }

}  // namespace simt
