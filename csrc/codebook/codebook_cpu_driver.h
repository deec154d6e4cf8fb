// The CPU codebook-lookup driver, templated on a register-blocked micro-kernel.
//
// Included by one .cpp per ISA, each inside its own namespace (IMGTX_CPU_NS), so the
// instantiations compiled with -mavx2 never merge with the portable ones at link time.
//
// Work split: tasks are blocks of rows (threads split over rows; micro_tiles_per_task).
// A task packs its rows once, then sweeps the codebook chunk by chunk (each chunk sized for
// L2). Within a chunk the dims are blocked by kDimBlock so that one code tile's slice stays
// in L1 while the rows stream past it (see codebook_cpu_internal.h for the measurements);
// partial dot products wait in a small per-task buffer between dim blocks. On the last dim block the micro-kernel folds its MR x NR scores, straight from
// registers, into a per-lane running (best, index, second-best). The FMA chain of each
// (row, code) stays one sequential chain, so results do not depend on the blocking.
// No N x K buffer exists anywhere. At the end each row's lanes are merged, the result is
// certified exact (certify.h) or re-searched in float64, and the outputs are written.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "codebook/certify.h"
#include "codebook/codebook_cpu_internal.h"
#include "common/cache_line.h"
#include "common/thread_pool.h"

namespace imgtx {
namespace IMGTX_CPU_NS {

// Rescans one row (z at stride MR in the packed panel) against every code and lists, in
// increasing order, the codes scoring <= threshold: a plain loop the compiler vectorises for
// the TU's ISA. Its fp32 scores obey the same error bound as the micro-kernel's (certify.h).
template <int NR>
void collect_candidates_impl(const codebook::PackedCodebook& cb, const float* z, int64_t D,
                             int MR, double threshold, LineVector<float>& zrow,
                             LineVector<int32_t>& out) {
  zrow.resize(size_t(D));
  for (int64_t d = 0; d < D; ++d) zrow[size_t(d)] = z[d * MR];
  out.clear();
  for (int64_t j = 0; j < cb.tiles; ++j) {
    const float* b = cb.panels.get() + j * D * NR;
    float acc[NR] = {};
    for (int64_t d = 0; d < D; ++d)
      for (int l = 0; l < NR; ++l) acc[l] += zrow[size_t(d)] * b[d * NR + l];
    for (int l = 0; l < NR; ++l) {
      const float score = cb.norm32[size_t(j * NR + l)] - 2.0f * acc[l];
      if (double(score) <= threshold) out.push_back(int32_t(j * NR + l));
    }
  }
}

template <class MK>
void codebook_lookup_driver(const CodebookLookupParams& p, int num_threads) {
  constexpr int MR = MK::MR, NR = MK::NR;
  const int64_t N = p.batch * p.rows, D = p.dim;
  if (N == 0) return;
  const codebook::PackedCodebook cb = codebook::pack_codebook(p, NR, num_threads);
  const int64_t chunk = codebook::code_tiles_per_chunk(D, NR);
  const int64_t dim_block = codebook::kDimBlock;
  const int64_t rows_per_task = MR * codebook::micro_tiles_per_task(N, MR, num_threads);
  const int64_t tasks = (N + rows_per_task - 1) / rows_per_task;
  const int workers = parallel_workers(tasks, num_threads);

  struct alignas(kCacheLine) Scratch {  // (common/cache_line.h: no line shared between workers)
    LineVector<float> zpanel, partial, best, second;
    LineVector<int32_t> index;
    LineVector<double> znorm;
    LineVector<char> finite;
    LineVector<float> zrow;           // one uncertified row, contiguous
    LineVector<int32_t> candidates;   // its possible exact argmins
    LineVector<float> out_row;        // finalize_row's scratch
  };
  LineVector<Scratch> scratch(workers);
  for (auto& s : scratch) {
    s.zpanel.resize(size_t(rows_per_task * D));
    if (D > dim_block) s.partial.resize(size_t(rows_per_task * chunk * NR));
    s.best.resize(size_t(rows_per_task * NR));
    s.second.resize(size_t(rows_per_task * NR));
    s.index.resize(size_t(rows_per_task * NR));
    s.znorm.resize(size_t(rows_per_task));
    s.finite.resize(size_t(rows_per_task));
    s.out_row.resize(size_t(2 * D));
  }
  const float inf = std::numeric_limits<float>::infinity();
  const auto collect_candidates = [&](const codebook::PackedCodebook& c, const float* z,
                                      int64_t dim, double threshold, LineVector<float>& zrow,
                                      LineVector<int32_t>& out) {
    collect_candidates_impl<NR>(c, z, dim, MR, threshold, zrow, out);
  };

  parallel_for(tasks, num_threads, [&](int64_t task, int worker) {
    Scratch& s = scratch[size_t(worker)];
    const int64_t n0 = task * rows_per_task;
    const int64_t count = std::min(rows_per_task, N - n0);
    const int64_t micro_tiles = (count + MR - 1) / MR;
    codebook::pack_z_rows(p, n0, count, MR, s.zpanel.data(), s.znorm.data(),
                          reinterpret_cast<bool*>(s.finite.data()));
    std::fill(s.best.begin(), s.best.end(), inf);
    std::fill(s.second.begin(), s.second.end(), inf);
    std::fill(s.index.begin(), s.index.end(), 0);

    for (int64_t j0 = 0; j0 < cb.tiles; j0 += chunk) {
      const int64_t j1 = std::min(cb.tiles, j0 + chunk);
      for (int64_t d0 = 0; d0 < D; d0 += dim_block) {
        const int64_t len = std::min(dim_block, D - d0);
        const bool first = d0 == 0, last = d0 + len == D;
        // Code tile outer, row micro-tile inner: the code tile's slice stays in L1.
        for (int64_t j = j0; j < j1; ++j) {
          const float* b = cb.panels.get() + j * D * NR + d0 * NR;
          for (int64_t i = 0; i < micro_tiles; ++i) {
            float* partial = last && first ? nullptr
                                           : s.partial.data() + ((j - j0) * micro_tiles + i) * MR * NR;
            MK::tile(s.zpanel.data() + i * D * MR + d0 * MR, b, len, partial, first, last,
                     cb.norm32.data() + j * NR, int32_t(j * NR), s.best.data() + i * MR * NR,
                     s.second.data() + i * MR * NR, s.index.data() + i * MR * NR);
          }
        }
      }
    }

    for (int64_t r = 0; r < count; ++r) {
      const float* bl = s.best.data() + r * NR;
      const float* sl = s.second.data() + r * NR;
      const int32_t* il = s.index.data() + r * NR;
      int lane = 0;
      for (int l = 1; l < NR; ++l)
        if (bl[l] < bl[lane] || (bl[l] == bl[lane] && il[l] < il[lane])) lane = l;
      float second = sl[lane];
      for (int l = 0; l < NR; ++l)
        if (l != lane) second = std::min(second, bl[l]);
      const bool finite = s.finite[size_t(r)] != 0;
      const double znorm = s.znorm[size_t(r)];
      const int64_t n = n0 + r;
      int64_t idx = il[lane];
      if (!finite || !codebook::argmin_is_certified(bl[lane], second, znorm, cb.norm_max, D)) {
        if (finite && std::fabs(bl[lane]) < 1e38f &&
            codebook::scores_are_finite_range(znorm, cb.norm_max)) {
          collect_candidates(cb, s.zpanel.data() + (r / MR) * D * MR + r % MR, D,
                             codebook::candidate_threshold(bl[lane], znorm, cb.norm_max, D),
                             s.zrow, s.candidates);
          idx = codebook::exact_search_row(p, n, true, s.candidates.data(),
                                           int64_t(s.candidates.size()));
          codebook::count_recheck(false, int64_t(s.candidates.size()));
        } else {
          idx = codebook::exact_search_row(p, n, finite);
          codebook::count_recheck(true);
        }
      }
      codebook::finalize_row(p, n, idx, s.out_row.data());
    }
  });
}

}  // namespace IMGTX_CPU_NS
}  // namespace imgtx
