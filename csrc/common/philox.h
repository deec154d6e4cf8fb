// Counter-based Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
//
// Why counter-based: a draw is a pure function of (key, counter), so every token gets the same
// random numbers whichever thread or CUDA block handles it, and no generator state has to be
// carried between kernels. Shared by the CPU and CUDA backends (IMGTX_HD).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace imgtx {

struct Philox4 {
  uint32_t v[4];
};

IMGTX_HD uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = uint64_t(a) * uint64_t(b);
  *hi = uint32_t(p >> 32);
  return uint32_t(p);
}

// Ten rounds of Philox-4x32 on counter (c0, c1, c2, c3) with key (k0, k1).
IMGTX_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = philox_mulhilo(0xCD9E8D57u, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// A uniform double in [0, 1) with 53 random bits from two 32-bit words.
IMGTX_HD double uniform53(uint32_t hi, uint32_t lo) {
  const uint64_t bits = (uint64_t(hi >> 5) << 26) | uint64_t(lo >> 6);
  return double(bits) * (1.0 / 9007199254740992.0);  // 2^-53
}

// Two independent 53-bit uniforms for item `index` of stream `stream` under `seed`.
IMGTX_HD void philox_uniform2(uint64_t seed, uint64_t index, uint32_t stream, double* u0,
                              double* u1) {
  const Philox4 r = philox4x32_10(uint32_t(index), uint32_t(index >> 32), stream, 0u,
                                  uint32_t(seed), uint32_t(seed >> 32));
  *u0 = uniform53(r.v[0], r.v[1]);
  *u1 = uniform53(r.v[2], r.v[3]);
}

}  // namespace imgtx
