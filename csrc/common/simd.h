// Width-generic SIMD over GCC/Clang vector extensions, for element-wise kernels.
//
// Why vector extensions instead of intrinsics: the same source is compiled once per ISA file
// (portable / -mavx2 -mfma / -mavx512f) and the compiler maps Vec<16> onto zmm registers,
// Vec<8> onto ymm or SSE/NEON pairs. Hot loops that need a specific instruction (the codebook
// micro-kernels) use intrinsics instead; exp/log/reductions do not.
//
// exp and log are our own polynomials (Cephes' single-precision minimax coefficients, ~1 ulp
// on the ranges used) because libm's vector variants live in libmvec, a shared library the
// compiled core must not depend on.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace imgtx {
namespace simd {

template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
  typedef double D __attribute__((vector_size(8 * W)));
};

template <int W>
inline typename Vec<W>::F load(const float* p) {
  typename Vec<W>::F v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
inline void store(float* p, typename Vec<W>::F v) {
  std::memcpy(p, &v, sizeof(v));
}

template <int W>
inline typename Vec<W>::F splat(float x) {
  return typename Vec<W>::F{} + x;
}

// x in every lane, as one broadcast (a load-port vbroadcastss from memory). splat's 0 + x is
// not x for x = -0, so the compiler keeps the add: a scalar add and a register broadcast on
// the shuffle port, which on cores with two 512-bit FMA ports is one of the FMA ports (the
// attention micro-kernel ran at half the FMA rate). x - (+0) is x for every x, so it folds away.
template <int W>
inline typename Vec<W>::F broadcast(float x) {
  return x - typename Vec<W>::F{};
}

// W bf16 values (raw bits) widened to float: bf16 is the top half of a float, so this is a
// shift, exact, and needs no conversion instruction.
template <int W>
inline typename Vec<W>::F load_bf16(const uint16_t* p) {
  typedef uint16_t H __attribute__((vector_size(2 * W)));
  H h;
  std::memcpy(&h, p, sizeof(h));
  const typename Vec<W>::I bits = __builtin_convertvector(h, typename Vec<W>::I) << 16;
  typename Vec<W>::F v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// W IEEE fp16 values (raw bits) widened to float, exactly (subnormals, inf and NaN
// included), with integer and float vector operations only: no F16C needed, so the portable
// build gets it too. The exponent is rebased by 112; inf/NaN get another 112; subnormals are
// renormalised by one float subtraction of 2^-14.
template <int W>
inline typename Vec<W>::F load_f16(const uint16_t* p) {
  // Unsigned lanes: inf/NaN bits + 2^23 in the (discarded) subnormal lane would overflow int32,
  // which is undefined behaviour (UBSan, scripts/sanitize.sh); unsigned arithmetic wraps.
  typedef uint32_t U __attribute__((vector_size(4 * W)));
  typedef typename Vec<W>::F F;
  typedef uint16_t H __attribute__((vector_size(2 * W)));
  H h;
  std::memcpy(&h, p, sizeof(h));
  const U x = (U)__builtin_convertvector(h, typename Vec<W>::I);  // 0..65535: a plain bitcast
  const U shifted = (x & 0x7fffu) << 13;
  const U exp = shifted & (0x1fu << 23);
  U bits = shifted + (112u << 23);
  bits = exp == (0x1fu << 23) ? bits + (112u << 23) : bits;  // inf / NaN
  F f;
  std::memcpy(&f, &bits, sizeof(f));
  const U sub_bits = bits + (1u << 23);  // subnormal: 2^-14 * (1 + m) - 2^-14 = 2^-14 * m
  F sub;
  std::memcpy(&sub, &sub_bits, sizeof(sub));
  sub = sub - 6.103515625e-05f;
  f = exp == 0 ? sub : f;
  U out;
  std::memcpy(&out, &f, sizeof(out));
  out |= (x & 0x8000u) << 16;
  std::memcpy(&f, &out, sizeof(f));
  return f;
}

template <class V>
inline float hmax(V v, int W) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// The low and high halves of a W-lane float vector as W/2-lane vectors (register shuffles:
// going through memory would put the caller's accumulators on the stack).
template <int W>
struct Halves;
template <>
struct Halves<16> {
  static Vec<8>::F lo(Vec<16>::F v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
  static Vec<8>::F hi(Vec<16>::F v) {
    return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  }
};
template <>
struct Halves<8> {
  static Vec<4>::F lo(Vec<8>::F v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3); }
  static Vec<4>::F hi(Vec<8>::F v) { return __builtin_shufflevector(v, v, 4, 5, 6, 7); }
};

// A float64 accumulator for W float lanes, held as two native-width double vectors: a single
// 2W-byte double vector (Vec<W>::D) is wider than a register and GCC spills it to the stack
// on every add (measured: a 5x slower loop).
template <int W>
struct DoubleAcc {
  typedef typename Vec<W / 2>::D H;
  H lo{}, hi{};
  void add(typename Vec<W>::F v) {
    lo += __builtin_convertvector(Halves<W>::lo(v), H);
    hi += __builtin_convertvector(Halves<W>::hi(v), H);
  }
  // The W per-lane sums, in lane order.
  void lanes(double* out) const {
    for (int i = 0; i < W / 2; ++i) {
      out[i] = lo[i];
      out[W / 2 + i] = hi[i];
    }
  }
  double sum() const {
    const H s = lo + hi;
    double r = 0.0;
    for (int i = 0; i < W / 2; ++i) r += s[i];
    return r;
  }
};

template <class V>
inline double hsum(V v, int W) {
  double s = 0.0;
  for (int i = 0; i < W; ++i) s += double(v[i]);
  return s;
}

// exp's argument reduction: n = round(x / ln 2) (x clamped to >= -87.34, so n in [-126, 0]).
template <int W>
inline typename Vec<W>::F exp_reduce(typename Vec<W>::F x) {
  typedef typename Vec<W>::F F;
  const F shifter = splat<W>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  return (x * 1.44269504088896341f + shifter) - shifter;
}

// exp(x - n ln 2) on |x - n ln 2| <= ln 2 / 2: Cephes' minimax polynomial, ln 2 in two parts.
template <int W>
inline typename Vec<W>::F exp_poly(typename Vec<W>::F x, typename Vec<W>::F n) {
  typedef typename Vec<W>::F F;
  F r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const F r2 = r * r;
  F p = splat<W>(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  return p * r2 + r + 1.0f;
}

// exp(x) for x <= 0 (softmax inputs shifted by their max, the only use): results below
// FLT_MIN flush to 0 (-inf -> 0). Positive x is not clamped (it would cost two instructions
// per vector in the hottest loop), so x must not exceed 88.
template <int W>
inline typename Vec<W>::F exp(typename Vec<W>::F x) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
#if defined(__AVX512F__)
  if constexpr (W == 16) {
    // The same arithmetic in fewer instructions: one mask (x >= lo, or NaN) both clamps x and,
    // through vscalefps' zero-masking, zeroes those lanes' p * 2^n; the scaling is one
    // instruction instead of four. Bitwise equal to the generic path.
    const __m512 lo = _mm512_set1_ps(-87.33654f);
    const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, lo, _CMP_NLT_UQ);
    x = (F)_mm512_mask_blend_ps(keep, lo, (__m512)x);
    const F n = exp_reduce<W>(x);
    return (F)_mm512_maskz_scalef_ps(keep, (__m512)exp_poly<W>(x, n), (__m512)n);
  }
#endif
  const I tiny = x < -87.33654f;
  x = tiny ? splat<W>(-87.33654f) : x;
  const F n = exp_reduce<W>(x);
  const F p = exp_poly<W>(x, n);
  const I e = (__builtin_convertvector(n, I) + 127) << 23;
  F scale;
  std::memcpy(&scale, &e, sizeof(scale));
  const F y = p * scale;
  return tiny ? F{} : y;
}

// log(x) for positive normal x (callers clamp to FLT_MIN first).
template <int W>
inline typename Vec<W>::F log(typename Vec<W>::F x) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  I bits;
  std::memcpy(&bits, &x, sizeof(bits));
  I e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  F m;
  std::memcpy(&m, &bits, sizeof(m));
  const I small = m < 0.707106781186547524f;  // move to [sqrt(1/2), sqrt(2))
  e = small ? e - 1 : e;
  m = small ? m + m : m;
  const F f = m - 1.0f;
  const F z = f * f;
  F p = splat<W>(7.0376836292E-2f);
  p = p * f - 1.1514610310E-1f;
  p = p * f + 1.1676998740E-1f;
  p = p * f - 1.2420140846E-1f;
  p = p * f + 1.4249322787E-1f;
  p = p * f - 1.6668057665E-1f;
  p = p * f + 2.0000714765E-1f;
  p = p * f - 2.4999993993E-1f;
  p = p * f + 3.3333331174E-1f;
  const F fe = __builtin_convertvector(e, F);
  F y = p * f * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return f + y + fe * 0.693359375f;
}

}  // namespace simd
}  // namespace imgtx
