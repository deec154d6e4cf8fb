// Portable micro-kernel: plain C++ over fixed-size arrays, which compilers vectorise for the
// baseline ISA of any target (SSE2 on x86-64, NEON on aarch64).
#define IMGTX_CPU_NS portable
#include "codebook/codebook_cpu_driver.h"

#include <cstring>

namespace imgtx {
namespace {

// 4 x 8 tile in 8 four-lane accumulators (GCC/Clang vector extensions map them to SSE2 on
// x86-64 and NEON on aarch64; 8 + 2 + 1 registers fit both register files).
struct PortableKernel {
  static constexpr int MR = 4, NR = 8;
  typedef float v4 __attribute__((vector_size(16)));

  // Same contract as Avx2Kernel::tile (codebook_avx2.cpp).
  static void tile(const float* a, const float* b, int64_t D, float* partial, bool first,
                   bool last, const float* norm, int32_t k0, float* best, float* second,
                   int32_t* index) {
    v4 acc[MR][2] = {};
    if (!first) std::memcpy(acc, partial, sizeof(acc));
    for (int64_t d = 0; d < D; ++d) {
      v4 b0, b1;
      std::memcpy(&b0, b + d * NR, sizeof(v4));
      std::memcpy(&b1, b + d * NR + 4, sizeof(v4));
      for (int r = 0; r < MR; ++r) {
        const float ar = a[d * MR + r];
        acc[r][0] += ar * b0;
        acc[r][1] += ar * b1;
      }
    }
    if (!last) {
      std::memcpy(partial, acc, sizeof(acc));
      return;
    }
    for (int r = 0; r < MR; ++r) {
      for (int l = 0; l < NR; ++l) {
        const float s = norm[l] - 2.0f * acc[r][l / 4][l % 4];
        float& bv = best[r * NR + l];
        float& sv = second[r * NR + l];
        sv = std::min(sv, std::max(bv, s));
        if (s < bv) {  // strict: the earliest (lowest) index wins exact ties
          bv = s;
          index[r * NR + l] = k0 + l;
        }
      }
    }
  }
};

}  // namespace

void codebook_lookup_cpu_portable(const CodebookLookupParams& p, int num_threads) {
  portable::codebook_lookup_driver<PortableKernel>(p, num_threads);
}

}  // namespace imgtx
