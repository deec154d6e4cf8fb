// Pieces of the CPU codebook lookup that are not hot loops: compiled once, portably, and
// shared by every ISA-specific driver (codebook_cpu_driver.h).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "imgtx/codebook.h"

namespace imgtx {
namespace codebook {

// The codebook in the micro-kernel's layout: tiles of NR codes, each stored [D][NR] so one
// vector load gives NR codes at one coordinate. Codes past K, and codes holding NaN/Inf, are
// zeros with norm +inf, so their score is +inf and they are never picked.
struct PackedCodebook {
  int64_t tiles = 0;
  std::unique_ptr<float[]> panels;  // tiles * D * NR
  std::vector<float> norm32;  // tiles * NR: |c|^2 (l2) or 0 (cosine), +inf for dead slots
  double norm_max = 0.0;      // max |c| over finite codes (1 for cosine): the error bound's C
};
PackedCodebook pack_codebook(const CodebookLookupParams& p, int nr, int num_threads);

// Rows [n0, n0 + count) of z as fp32 in micro-panels of `mr` rows: out[(i * D + d) * mr + r]
// holds row n0 + i * mr + r (zero for padding rows). norms[r] = |z_row| (fp64);
// finite[r] = whether the row holds no NaN/Inf.
void pack_z_rows(const CodebookLookupParams& p, int64_t n0, int64_t count, int mr, float* out,
                 double* norms, bool* finite);

// The float64 argmin of row n over the given candidate codes (increasing), or over all codes
// when candidates is null; ties go to the lowest index; 0 for a non-finite row.
int64_t exact_search_row(const CodebookLookupParams& p, int64_t n, bool row_finite,
                         const int32_t* candidates = nullptr, int64_t num_candidates = 0);

// Bumps the process-wide CodebookCounters (relaxed atomics: one add per uncertified row, and
// one for its number of candidate codes).
void count_recheck(bool full_search, int64_t candidates = 0);

// Writes indices[n], quantized[n, :], sqdist[n] and counts[index] for row n; scratch holds
// 2 * dim floats.
void finalize_row(const CodebookLookupParams& p, int64_t n, int64_t index, float* scratch);

// Blocking (measured on a Zen 4 core, fp32 D = 256, K = 8192: 48 rows per task ran at
// 68-77 GFLOP/s, 384 rows at 93-95, the torch.mm ceiling being 88): a task streams the whole
// codebook from L3 once, so big tasks amortise it; dims are blocked so that one code tile's
// slice (64 x NR floats, 4 KB) stays in L1 while the task's z slices stream from L2.
constexpr int kMaxMicroTilesPerTask = 64;
constexpr int64_t kDimBlock = 64;
// Row micro-tiles per task: as many as kMaxMicroTilesPerTask allows while every thread still
// gets about four tasks (load balance for small N).
int64_t micro_tiles_per_task(int64_t rows, int mr, int num_threads);
int64_t code_tiles_per_chunk(int64_t dim, int nr);

}  // namespace codebook

// The ISA-specific entry points (codebook_portable.cpp, codebook_avx2.cpp).
void codebook_lookup_cpu_portable(const CodebookLookupParams& p, int num_threads);
void codebook_lookup_cpu_avx2(const CodebookLookupParams& p, int num_threads);
void codebook_lookup_cpu_avx512(const CodebookLookupParams& p, int num_threads);

}  // namespace imgtx
