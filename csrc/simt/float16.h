// fp16 and bf16 conversions of the emulated GPU: round to nearest even, subnormals kept,
// overflow to infinity, NaN to the canonical 0x7fff as the GPU's cvt gives. Checked on all 65536
// patterns in tests/test_simt_emulator.py.
#pragma once

#include <cstdint>
#include <cstring>

#include "imgtx/dtype.h"

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

// The library's conversions (imgtx/dtype.h) round exactly as the GPU does; only NaN differs:
// the GPU's cvt gives the canonical 0x7fff where the CPU keeps the sign and payload bits.
inline unsigned short f32_to_f16_bits(float v) {
  return (f32_bits(v) & 0x7fffffffu) > 0x7f800000u ? 0x7fffu : imgtx::float_to_half_bits(v);
}
inline float f16_bits_to_f32(unsigned short h) { return imgtx::half_bits_to_float(h); }
inline unsigned short f32_to_bf16_bits(float v) {
  return (f32_bits(v) & 0x7fffffffu) > 0x7f800000u ? 0x7fffu : imgtx::float_to_bf16_bits(v);
}
inline float bf16_bits_to_f32(unsigned short h) { return imgtx::bf16_bits_to_float(h); }

}  // namespace simt
