// CPU codebook lookup: argument checks, ISA dispatch, and the parts of the algorithm that are
// O(K*D) or O(N*D) (packing, float64 re-search of uncertified rows, writing outputs).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "codebook/codebook_cpu_internal.h"
#include "common/cpu_features.h"
#include "common/fp64_sum.h"
#include "common/thread_pool.h"

namespace imgtx {

void validate(const CodebookLookupParams& p) {
  auto fail = [](const std::string& m) { throw std::invalid_argument("codebook_lookup: " + m); };
  if (p.batch < 0 || p.rows < 0) fail("negative number of rows");
  if (p.dim < 1) fail("dim must be >= 1");
  if (p.num_codes < 1) fail("codebook must hold at least one code");
  if (p.num_codes > std::numeric_limits<int32_t>::max()) fail("more than 2^31 - 1 codes");
  if (p.batch * p.rows > 0 && (!p.z || !p.indices)) fail("null z or indices pointer");
  if (!p.codebook) fail("null codebook pointer");
}

namespace codebook {
namespace {

std::atomic<int64_t> g_rows_rechecked{0}, g_rows_full_search{0}, g_codes_rechecked{0};

// Code k as doubles; returns |c|^2 (non-finite iff the code holds NaN/Inf).
double load_code(const CodebookLookupParams& p, int64_t k, float* tmp, double* out) {
  load_strided_as_float(p.codebook, k * p.cb_stride_code, p.cb_stride_dim, p.dim,
                        p.codebook_dtype, tmp);
  for (int64_t d = 0; d < p.dim; ++d) out[d] = tmp[d];
  return sum_in_lanes(p.dim, [&](int64_t d) { return out[d] * out[d]; });
}

int64_t z_offset(const CodebookLookupParams& p, int64_t n) {
  const int64_t b = p.rows ? n / p.rows : 0;
  return b * p.z_stride_batch + (n - b * p.rows) * p.z_stride_row;
}

double cosine_scale(double norm2) { return 1.0 / std::max(std::sqrt(norm2), 1e-12); }

}  // namespace

int64_t micro_tiles_per_task(int64_t rows, int mr, int num_threads) {
  const int64_t per_thread = int64_t(mr) * std::max(1, num_threads) * 4;
  return std::clamp<int64_t>((rows + per_thread - 1) / per_thread, 1, kMaxMicroTilesPerTask);
}

int64_t code_tiles_per_chunk(int64_t dim, int nr) {
  const int64_t bytes = 256 * 1024;  // about a quarter of a Zen/Skylake L2: room for z and state
  return std::max<int64_t>(1, bytes / (dim * nr * int64_t(sizeof(float))));
}

PackedCodebook pack_codebook(const CodebookLookupParams& p, int nr, int num_threads) {
  const int64_t K = p.num_codes, D = p.dim;
  PackedCodebook cb;
  cb.tiles = (K + nr - 1) / nr;
  // Uninitialised: every slot is written below (packing is most of a call at small N).
  cb.panels.reset(new float[size_t(cb.tiles * D * nr)]);
  cb.norm32.resize(size_t(cb.tiles * nr));
  std::vector<double> tile_max(size_t(cb.tiles), 0.0);
  const bool cosine = p.metric == CodebookMetric::kCosine;
  const int workers = parallel_workers(cb.tiles, num_threads);
  std::vector<std::vector<float>> tmp(workers, std::vector<float>(size_t(D)));
  parallel_for(cb.tiles, num_threads, [&](int64_t t, int w) {
    float* panel = cb.panels.get() + t * D * nr;
    float* c = tmp[size_t(w)].data();
    for (int l = 0; l < nr; ++l) {
      const int64_t k = t * nr + l;
      double n2 = std::numeric_limits<double>::infinity();  // padding slots are dead too
      if (k < K) {
        load_strided_as_float(p.codebook, k * p.cb_stride_code, p.cb_stride_dim, D,
                              p.codebook_dtype, c);
        n2 = sum_in_lanes(D, [&](int64_t d) { return double(c[d]) * double(c[d]); });
      }
      float& norm = cb.norm32[size_t(t * nr + l)];
      if (!std::isfinite(n2)) {  // dead slot: zeros, norm +inf, never picked
        for (int64_t d = 0; d < D; ++d) panel[d * nr + l] = 0.0f;
        norm = std::numeric_limits<float>::infinity();
        continue;
      }
      if (cosine) {
        const double scale = cosine_scale(n2);
        for (int64_t d = 0; d < D; ++d) panel[d * nr + l] = float(double(c[d]) * scale);
      } else {
        for (int64_t d = 0; d < D; ++d) panel[d * nr + l] = c[d];
      }
      norm = cosine ? 0.0f : float(n2);
      tile_max[size_t(t)] = std::max(tile_max[size_t(t)], std::sqrt(n2));
    }
  });
  cb.norm_max = cosine ? 1.0 : *std::max_element(tile_max.begin(), tile_max.end());
  return cb;
}

void pack_z_rows(const CodebookLookupParams& p, int64_t n0, int64_t count, int mr, float* out,
                 double* norms, bool* finite) {
  const int64_t D = p.dim;
  const int64_t padded = (count + mr - 1) / mr * mr;
  std::vector<float> row(static_cast<size_t>(D));
  for (int64_t r = 0; r < padded; ++r) {
    float* dst = out + (r / mr) * D * mr + (r % mr);
    if (r >= count) {
      for (int64_t d = 0; d < D; ++d) dst[d * mr] = 0.0f;
      continue;
    }
    load_strided_as_float(p.z, z_offset(p, n0 + r), p.z_stride_dim, D, p.z_dtype, row.data());
    for (int64_t d = 0; d < D; ++d) dst[d * mr] = row[size_t(d)];
    const double n2 = sum_in_lanes(D, [&](int64_t d) {
      return double(row[size_t(d)]) * double(row[size_t(d)]);  // exact: a float's square
    });
    norms[r] = std::sqrt(n2);
    finite[r] = std::isfinite(n2);  // squares of floats cannot overflow a double
  }
}

int64_t exact_search_row(const CodebookLookupParams& p, int64_t n, bool row_finite,
                         const int32_t* candidates, int64_t num_candidates) {
  if (!row_finite) return 0;
  const int64_t D = p.dim;
  thread_local std::vector<float> tmp;
  thread_local std::vector<double> z, c;
  tmp.resize(size_t(D));
  z.resize(size_t(D));
  c.resize(size_t(D));
  load_strided_as_float(p.z, z_offset(p, n), p.z_stride_dim, D, p.z_dtype, tmp.data());
  for (int64_t d = 0; d < D; ++d) z[size_t(d)] = tmp[size_t(d)];
  const bool cosine = p.metric == CodebookMetric::kCosine;
  const int64_t count = candidates ? num_candidates : p.num_codes;
  int64_t best_k = 0;
  double best = std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t k = candidates ? candidates[i] : i;
    const double n2 = load_code(p, k, tmp.data(), c.data());
    if (!std::isfinite(n2)) continue;
    double dist = 0.0;
    if (cosine) {
      for (int64_t d = 0; d < D; ++d) dist -= z[size_t(d)] * c[size_t(d)];
      dist *= cosine_scale(n2);
    } else {
      for (int64_t d = 0; d < D; ++d) {
        const double e = z[size_t(d)] - c[size_t(d)];
        dist += e * e;
      }
    }
    if (dist < best) {
      best = dist;
      best_k = k;
    }
  }
  return best_k;
}

void count_recheck(bool full_search, int64_t candidates) {
  (full_search ? g_rows_full_search : g_rows_rechecked).fetch_add(1, std::memory_order_relaxed);
  if (candidates) g_codes_rechecked.fetch_add(candidates, std::memory_order_relaxed);
}

void finalize_row(const CodebookLookupParams& p, int64_t n, int64_t index, float* scratch) {
  p.indices[n] = index;
  if (p.counts) __atomic_fetch_add(&p.counts[index], int64_t(1), __ATOMIC_RELAXED);
  if (!p.quantized && !p.sqdist) return;
  const int64_t D = p.dim;
  float* q = scratch;
  float* z = scratch + D;
  load_strided_as_float(p.codebook, index * p.cb_stride_code, p.cb_stride_dim, D,
                        p.codebook_dtype, q);
  // An l2 code already in z's dtype is written as is: a byte copy, no conversions (they were
  // a fifth of a call's time for fp16 at small K), so NaN payloads are kept bit for bit
  // whatever the codebook's strides (the CUDA finalize does the same).
  const bool copy_code = p.metric == CodebookMetric::kL2 && p.codebook_dtype == p.z_dtype;
  if (p.metric == CodebookMetric::kCosine) {
    const double n2 = sum_in_lanes(D, [&](int64_t d) { return double(q[d]) * double(q[d]); });
    const double scale = cosine_scale(n2);  // the same n2 as load_code's
    for (int64_t d = 0; d < D; ++d) q[d] = float(double(q[d]) * scale);
  }
  if (copy_code) {  // q is already the value as written
    if (p.quantized) {
      const size_t bytes = size_t(dtype_size(p.z_dtype));
      char* dst = static_cast<char*>(p.quantized) + size_t(n * D) * bytes;
      const char* src = static_cast<const char*>(p.codebook);
      if (p.cb_stride_dim == 1) {
        std::memcpy(dst, src + size_t(index * p.cb_stride_code) * bytes, size_t(D) * bytes);
      } else {
        for (int64_t d = 0; d < D; ++d)
          std::memcpy(dst + size_t(d) * bytes,
                      src + size_t(index * p.cb_stride_code + d * p.cb_stride_dim) * bytes, bytes);
      }
    }
  } else if (p.quantized) {  // q becomes the value as written
    store_rounded_as_dtype(p.quantized, n * D, q, D, p.z_dtype);
  } else {
    round_to_dtype_inplace(q, D, p.z_dtype);
  }
  if (!p.sqdist) return;
  load_strided_as_float(p.z, z_offset(p, n), p.z_stride_dim, D, p.z_dtype, z);
  p.sqdist[n] = float(sum_in_lanes(D, [&](int64_t d) {
    const double e = double(z[d]) - double(q[d]);  // exact for floats
    return e * e;
  }));
}

}  // namespace codebook

CodebookCounters codebook_counters() {
  CodebookCounters c;
  c.rows_rechecked = codebook::g_rows_rechecked.load();
  c.rows_full_search = codebook::g_rows_full_search.load();
  c.codes_rechecked = codebook::g_codes_rechecked.load();
  return c;
}

void reset_codebook_counters() {
  codebook::g_rows_rechecked.store(0);
  codebook::g_rows_full_search.store(0);
  codebook::g_codes_rechecked.store(0);
}

void add_codebook_counters(const CodebookCounters& c) {
  codebook::g_rows_rechecked.fetch_add(c.rows_rechecked, std::memory_order_relaxed);
  codebook::g_rows_full_search.fetch_add(c.rows_full_search, std::memory_order_relaxed);
  codebook::g_codes_rechecked.fetch_add(c.codes_rechecked, std::memory_order_relaxed);
}

void codebook_lookup_cpu(const CodebookLookupParams& p, int num_threads) {
  validate(p);
  if (p.batch * p.rows == 0) return;
  switch (active_cpu_isa()) {
#ifdef IMGTX_HAVE_X86_KERNELS
    case CpuIsa::kAvx512: return codebook_lookup_cpu_avx512(p, num_threads);
    case CpuIsa::kAvx2: return codebook_lookup_cpu_avx2(p, num_threads);
#endif
    default: return codebook_lookup_cpu_portable(p, num_threads);
  }
}

}  // namespace imgtx
