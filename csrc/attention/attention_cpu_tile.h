// Per-task building blocks of the CPU attention kernels: key blocks, packing, masking, softmax.
//
// Included by one .cpp per ISA inside its own namespace (IMGTX_CPU_NS), like the other
// families. A task owns one query tile of one (batch, head); its queries are processed in
// "subtiles" of kLanes = 32 queries, whose scores are held transposed ([key][32 queries]).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/attention_cpu_mm.h"
#include "attention/attention_plan.h"
#include "common/cache_line.h"
#include "common/simd.h"
#include "imgtx/attention.h"

namespace imgtx {
namespace IMGTX_CPU_NS {
namespace attn_cpu {

constexpr int kLanes = 32;
constexpr int32_t kPlainKey = std::numeric_limits<int32_t>::min();  // kpos of a key every query sees

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Scratch kept across calls: grown to at least n elements, never shrunk or cleared.
template <class Vector>
inline void grow_to(Vector& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// Micro-kernel shapes per vector width (see attention_cpu_mm.h).
template <int W>
struct Shape {
  static constexpr int kPanel = W == 16 ? 12 : 6;    // keys per K panel (S^T rows per call)
  static constexpr int kRows = W == 16 ? 8 : 4;      // rows per call of the row-major products
  static constexpr int kRowAlign = W == 16 ? 24 : 12;  // lcm(kPanel, kRows): key-block padding
};

inline const char* row_ptr(const AttnTensor& t, int64_t b, int64_t h, int64_t row) {
  return static_cast<const char*>(t.data) +
         (b * t.stride_batch + h * t.stride_head + row * t.stride_row) * dtype_size(t.dtype);
}

// Row `row` of t as fp32 in out[0, dim), zeros in out[dim, padded). Half-precision rows are
// widened 8 values at a time (simd.h: exact, no F16C needed); the scalar fp16 conversion made
// fp16 inputs 45% slower than fp32 ones.
inline void load_row(const AttnTensor& t, int64_t b, int64_t h, int64_t row, int64_t dim,
                     int64_t padded, float* out) {
  const char* src = row_ptr(t, b, h, row);
  int64_t d = 0;
  if (t.dtype != DType::kFloat32) {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(src);
    for (; d + 8 <= dim; d += 8)
      simd::store<8>(out + d, t.dtype == DType::kFloat16 ? simd::load_f16<8>(x + d)
                                                         : simd::load_bf16<8>(x + d));
  }
  load_strided_as_float(src, d, 1, dim - d, t.dtype, out + d);
  std::fill(out + dim, out + padded, 0.0f);
}

// Row `row` as fp32 at the padded width: in place when it already is, else converted into buf.
inline const float* row_fp32(const AttnTensor& t, int64_t b, int64_t h, int64_t row,
                             int64_t dim, int64_t padded, float* buf) {
  if (t.dtype == DType::kFloat32 && dim == padded)
    return reinterpret_cast<const float*>(row_ptr(t, b, h, row));
  load_row(t, b, h, row, dim, padded, buf);
  return buf;
}

// One block of up to `cap` keys drawn from the tile's segments, in order.
struct KeyBlock {
  LineVector<int64_t> row;   // key rows (per-worker scratch: cache_line.h)
  LineVector<int32_t> kpos;  // kPlainKey, or the key's position in a causal segment
  int64_t count = 0;
  int32_t kpos_max = kPlainKey;  // largest causal position (kPlainKey if none)
  int32_t kpos_min = 0;          // smallest causal position
  bool all_causal = false, contiguous = false;
};

// Walks the tile's segments block by block.
class KeyBlocks {
 public:
  KeyBlocks(const attn::QueryTile& tile, int64_t cap) : tile_(tile), cap_(cap) {}
  bool next(KeyBlock& blk) {
    blk.row.resize(size_t(cap_));
    blk.kpos.resize(size_t(cap_));
    blk.count = 0;
    blk.kpos_max = kPlainKey;
    blk.kpos_min = std::numeric_limits<int32_t>::max();
    blk.all_causal = true;
    while (blk.count < cap_ && seg_ < tile_.segments.size()) {
      const attn::KeySegment& s = tile_.segments[seg_];
      const int64_t n = std::min(cap_ - blk.count, s.len - off_);
      // Loops without a branch inside, which the compiler vectorises: a decode walks its cache
      // block by block, and these two arrays (12 bytes a key) cost a tenth of its loop when
      // written one key at a time.
      int64_t* row = blk.row.data() + blk.count;
      int32_t* kpos = blk.kpos.data() + blk.count;
      const int64_t row0 = s.start + off_;
      for (int64_t t = 0; t < n; ++t) row[t] = row0 + t;
      if (s.causal) {
        const int32_t kpos0 = int32_t(s.kpos0 + off_);
        for (int64_t t = 0; t < n; ++t) kpos[t] = kpos0 + int32_t(t);
      } else {
        std::fill(kpos, kpos + n, kPlainKey);
      }
      if (s.causal) {
        blk.kpos_min = std::min(blk.kpos_min, int32_t(s.kpos0 + off_));
        blk.kpos_max = std::max(blk.kpos_max, int32_t(s.kpos0 + off_ + n - 1));
      } else {
        blk.all_causal = false;
      }
      blk.count += n;
      off_ += n;
      if (off_ == s.len) {
        ++seg_;
        off_ = 0;
      }
    }
    if (blk.count == 0) return false;
    blk.contiguous = blk.row[size_t(blk.count - 1)] - blk.row[0] == blk.count - 1;
    return true;
  }

 private:
  const attn::QueryTile& tile_;
  int64_t cap_;
  size_t seg_ = 0;
  int64_t off_ = 0;
};

// The queries of one subtile: rows, positions, and the range of positions of real lanes.
struct Subtile {
  int count = 0;
  int64_t row[kLanes];
  int32_t qpos[kLanes];  // padding lanes: INT32_MAX (they see everything: finite, harmless)
  int32_t qmin = 0, qmax = 0;
};

inline void make_subtile(const attn::QueryTile& tile, int64_t first, Subtile& s) {
  s.count = int(std::min<int64_t>(kLanes, int64_t(tile.rows.size()) - first));
  s.qmin = std::numeric_limits<int32_t>::max();
  s.qmax = std::numeric_limits<int32_t>::min();
  for (int l = 0; l < kLanes; ++l) {
    if (l < s.count) {
      s.row[l] = tile.rows[size_t(first + l)];
      s.qpos[l] = tile.qpos[size_t(first + l)];
      s.qmin = std::min(s.qmin, s.qpos[l]);
      s.qmax = std::max(s.qmax, s.qpos[l]);
    } else {
      s.row[l] = -1;
      s.qpos[l] = std::numeric_limits<int32_t>::max();
    }
  }
}

// The lanes of a subtile that hold queries, rounded up to whole vectors. The products, softmax
// and transposes of the forward and the backward run on these only: 16 or fewer queries (a
// short sequence, or the last rows of a tile) leave half of the 32 lanes as padding, and
// computing them doubled the work.
template <int W>
inline int live_lanes(const Subtile& s) {
  return int(round_up(s.count, W));
}

// mm(l0, nv) over lanes [0, lanes) (a multiple of W): chunks of 2 vectors (the micro-kernels'
// usual width), then one vector if W lanes remain. nv is a std::integral_constant.
template <int W, class Mm>
inline void for_lane_chunks(int lanes, Mm&& mm) {
  int l0 = 0;
  for (; l0 + 2 * W <= lanes; l0 += 2 * W) mm(l0, std::integral_constant<int, 2>{});
  if (l0 < lanes) mm(l0, std::integral_constant<int, 1>{});
}

enum class Visibility { kNone, kPartial, kAll };

// Whether the subtile's queries see none, some or all of the block (causal rule only; a mask
// makes every visited block partial).
inline Visibility classify(const KeyBlock& blk, const Subtile& s, bool has_mask) {
  if (blk.all_causal && blk.kpos_min > s.qmax) return Visibility::kNone;
  if (blk.kpos_max > s.qmin || has_mask) return Visibility::kPartial;
  return Visibility::kAll;
}

// How many of the block's keys the subtile must visit: trailing keys no lane can see (causal
// positions beyond the subtile's last query, e.g. the diagonal block) are cut off.
inline int64_t visible_prefix(const KeyBlock& blk, const Subtile& s) {
  int64_t n = blk.count;
  if (blk.kpos_max <= s.qmax) return n;
  while (n > 0 && blk.kpos[size_t(n - 1)] > s.qmax) --n;
  return n;
}

// The user mask of query row `row` over the block's keys [first, first + count), applied to
// scores s[t * stride] (t counted from `first`): bool -> -inf where false, additive -> added.
// Shared by the tiled kernels (stride = kLanes, one lane) and the decode path (stride 1, one
// row, a chunk of the block at a time).
inline void apply_mask_row(const AttnMask& m, int64_t b, int64_t h, int64_t row,
                           const KeyBlock& blk, int64_t first, int64_t count, float* s,
                           int64_t stride) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int esize = m.kind == AttnMaskKind::kBool ? 1 : dtype_size(m.dtype);
  const char* base = static_cast<const char*>(m.data) +
                     (b * m.stride_batch + h * m.stride_head + row * m.stride_q) * esize;
  if (m.kind == AttnMaskKind::kBool) {
    const uint8_t* mb = reinterpret_cast<const uint8_t*>(base);
    for (int64_t t = 0; t < count; ++t)
      if (!mb[blk.row[size_t(first + t)] * m.stride_k]) s[t * stride] = ninf;
  } else {
    for (int64_t t = 0; t < count; ++t) {
      float add;
      load_strided_as_float(base, blk.row[size_t(first + t)] * m.stride_k, 1, 1, m.dtype, &add);
      s[t * stride] += add;
    }
  }
}

// st[t][lane] = -inf where key t is invisible to the lane's query (causal rule), then the
// mask (bool: -inf where false; additive: added) for every real lane.
template <int W>
void apply_masks(const AttnParams& p, int64_t b, int64_t h, const KeyBlock& blk, int64_t count,
                 const Subtile& s, float* st) {
  typedef typename simd::Vec<W>::F F;
  typedef typename simd::Vec<W>::I I;
  const float ninf = -std::numeric_limits<float>::infinity();
  if (blk.kpos_max > s.qmin) {
    I q[kLanes / W];
    for (int v = 0; v < kLanes / W; ++v) std::memcpy(&q[v], s.qpos + v * W, sizeof(I));
    for (int64_t t = 0; t < count; ++t) {
      const int32_t kp = blk.kpos[size_t(t)];
      if (kp <= s.qmin) continue;
      for (int v = 0; v < kLanes / W; ++v) {
        float* ptr = st + t * kLanes + v * W;
        const F x = simd::load<W>(ptr);
        simd::store<W>(ptr, kp <= q[v] ? x : simd::splat<W>(ninf));
      }
    }
  }
  if (p.mask.kind == AttnMaskKind::kNone) return;
  for (int l = 0; l < s.count; ++l)
    apply_mask_row(p.mask, b, h, s.row[l], blk, 0, count, st + l, kLanes);
}

// K rows of the block in panel layout: kp[(t / P) * dp * P + d * P + t % P] (zero padding).
template <int P>
void pack_panels(const AttnTensor& t, int64_t b, int64_t h, const KeyBlock& blk, int64_t dim,
                 int64_t dp, int64_t padded_count, float* kp, float* tmp) {
  for (int64_t j = 0; j < padded_count; ++j) {
    float* panel = kp + (j / P) * dp * P + j % P;
    if (j < blk.count) {
      const float* src = row_fp32(t, b, h, blk.row[size_t(j)], dim, dp, tmp);
      for (int64_t d = 0; d < dp; ++d) panel[d * P] = src[d];
    } else {
      for (int64_t d = 0; d < dp; ++d) panel[d * P] = 0.0f;
    }
  }
}

// The block's rows in place, when they already are fp32 at a fixed stride with the padded
// width (sets ld); null otherwise (they must be converted or packed).
inline const float* rows_in_place(const AttnTensor& t, int64_t b, int64_t h, const KeyBlock& blk,
                                  int64_t dim, int64_t dp, int64_t& ld) {
  if (t.dtype != DType::kFloat32 || !blk.contiguous || dim != dp) return nullptr;
  ld = t.stride_row;
  return reinterpret_cast<const float*>(row_ptr(t, b, h, blk.row[0]));
}

// Rows at most this many bytes apart are read in place by kernels that walk a block's rows
// many times (the O^T product: once per 12 columns of V and per subtile). Rows further apart
// (a fused qkv projection's view puts each head's rows 3 * width floats apart, every row on
// its own page) cost a TLB miss per row per pass, and the hardware prefetcher does not follow
// them: copying V once per block made a (2, 8, 1024, 64) call from such a view 4-5% faster at
// 1 thread; at 64 queries (2 subtiles) the copy cost more than it saved. K is read once per
// subtile in 12-row panels and gained nothing from a copy.
constexpr int64_t kInPlaceMaxRowBytes = 4096;

// Whether t's rows are close enough to read in place however often (kInPlaceMaxRowBytes).
inline bool rows_near(const AttnTensor& t) {
  return t.stride_row * dtype_size(t.dtype) <= kInPlaceMaxRowBytes;
}

// Rows of the block as fp32 [count][dp]: in place where possible (and, with near_only, where
// the rows are close together), else converted into buf.
inline const float* rows_fp32(const AttnTensor& t, int64_t b, int64_t h, const KeyBlock& blk,
                              int64_t dim, int64_t dp, float* buf, int64_t& ld,
                              bool near_only = false) {
  if (!near_only || rows_near(t))
    if (const float* rows = rows_in_place(t, b, h, blk, dim, dp, ld)) return rows;
  for (int64_t j = 0; j < blk.count; ++j)
    load_row(t, b, h, blk.row[size_t(j)], dim, dp, buf + j * dp);
  ld = dp;
  return buf;
}

// out[c * ldo + r] = scale * rows[r][c0 + c] for a 16 x 16 block, in registers: three rounds
// of shuffles (32-bit, 64-bit, 128-bit interleaves), 64 in all, against 256 scalar stores.
inline void transpose16(const float* const* rows, int64_t c0, float scale, float* out,
                        int64_t ldo) {
  typedef simd::Vec<16>::F F;
  F r[16], t[16], u[16];
  for (int i = 0; i < 16; ++i) r[i] = simd::load<16>(rows[i] + c0);
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = __builtin_shufflevector(r[2 * k], r[2 * k + 1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24,
                                       9, 25, 12, 28, 13, 29);
    t[2 * k + 1] = __builtin_shufflevector(r[2 * k], r[2 * k + 1], 2, 18, 3, 19, 6, 22, 7, 23,
                                           10, 26, 11, 27, 14, 30, 15, 31);
  }
  for (int k = 0; k < 4; ++k)
    for (int h = 0; h < 2; ++h) {
      const F a = t[4 * k + h], b = t[4 * k + 2 + h];
      u[4 * k + 2 * h] = __builtin_shufflevector(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25,
                                                 12, 13, 28, 29);
      u[4 * k + 2 * h + 1] = __builtin_shufflevector(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11,
                                                     26, 27, 14, 15, 30, 31);
    }
  // u[4k + m], 128-bit lane L: rows 4k..4k+3 at column 4L + m.
  for (int m = 0; m < 4; ++m) {
    const F A = u[m], B = u[4 + m], C = u[8 + m], D = u[12 + m];
    const F ab_lo = __builtin_shufflevector(A, B, 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const F ab_hi = __builtin_shufflevector(A, B, 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    const F cd_lo = __builtin_shufflevector(C, D, 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const F cd_hi = __builtin_shufflevector(C, D, 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    simd::store<16>(out + (0 + m) * ldo, scale * __builtin_shufflevector(ab_lo, cd_lo, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23));
    simd::store<16>(out + (4 + m) * ldo, scale * __builtin_shufflevector(ab_lo, cd_lo, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
    simd::store<16>(out + (8 + m) * ldo, scale * __builtin_shufflevector(ab_hi, cd_hi, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23));
    simd::store<16>(out + (12 + m) * ldo, scale * __builtin_shufflevector(ab_hi, cd_hi, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
  }
}

// Queries of the subtile transposed and scaled, qt[d][lane] = scale * q[row_lane][d], for its
// live lanes (live_lanes: the products never read the others). rows holds kLanes * dp floats of
// scratch (rows not already fp32 at full padded width).
template <int W>
void pack_transposed(const AttnTensor& t, int64_t b, int64_t h, const Subtile& s, int64_t dim,
                     int64_t dp, float scale, float* qt, float* rows) {
  const int lanes = live_lanes<W>(s);  // the columns past them are never read
  const float* src[kLanes];
  for (int l = 0; l < lanes; ++l) {
    float* buf = rows + l * dp;
    if (l >= s.count) {
      std::fill(buf, buf + dp, 0.0f);
      src[l] = buf;
    } else {
      src[l] = row_fp32(t, b, h, s.row[l], dim, dp, buf);
    }
  }
  if constexpr (W == 16) {
    for (int l0 = 0; l0 < lanes; l0 += 16)
      for (int64_t d0 = 0; d0 < dp; d0 += 16) transpose16(src + l0, d0, scale, qt + d0 * kLanes + l0, kLanes);
  } else {
    for (int l = 0; l < lanes; ++l)
      for (int64_t d = 0; d < dp; ++d) qt[d * kLanes + l] = scale * src[l][d];
  }
}

// C[32 rows][dp] (+)= sum_k A(k, r) B[k][:] over column chunks of 2W (and one W tail), with
// A(k, r) = a[k * AK + r * AR]: the row-major products (PV, dQ).
template <int W, int AK, int AR, bool kAccumulate>
void rows_times_matrix(int64_t kdim, const float* a, const float* bmat, int64_t ldb, float* c,
                       int64_t ldc, int64_t dp, int rows) {
  constexpr int MR = Shape<W>::kRows;
  for (int r0 = 0; r0 < rows; r0 += MR) {
    int64_t d0 = 0;
    for (; d0 + 2 * W <= dp; d0 += 2 * W)
      attn_mm::mm<W, MR, 2, AK, AR, kAccumulate>(kdim, a + r0 * AR, bmat + d0, ldb,
                                                 c + r0 * ldc + d0, ldc);
    if (d0 < dp)
      attn_mm::mm<W, MR, 1, AK, AR, kAccumulate>(kdim, a + r0 * AR, bmat + d0, ldb,
                                                 c + r0 * ldc + d0, ldc);
  }
}

// st[j][lane] = sum_d panel(j, d) * bt[d][lane] for keys j < count (rows up to the next third
// of a panel are written too) and lane < lanes (live_lanes): S^T = K Q^T and dP^T = V dO^T. The last, partial panel runs a
// shorter micro-kernel (a third, two thirds or all of its rows): short key lists (77 padded
// keys of cross attention) otherwise spend up to a panel of work on padding.
template <int W>
void panels_times_lanes(const float* kp, int64_t dp, int64_t count, const float* bt, float* st,
                        int lanes) {
  constexpr int P = Shape<W>::kPanel, T = P / 3;
  for (int64_t j0 = 0; j0 < count; j0 += P) {
    const float* panel = kp + (j0 / P) * dp * P;
    const int64_t rows = std::min<int64_t>(P, count - j0);
    for_lane_chunks<W>(lanes, [&](int l0, auto nv) {
      constexpr int NV = decltype(nv)::value;
      float* c = st + j0 * kLanes + l0;
      if (rows > 2 * T)
        attn_mm::mm<W, P, NV, P, 1, false>(dp, panel, bt + l0, kLanes, c, kLanes);
      else if (rows > T)
        attn_mm::mm<W, 2 * T, NV, P, 1, false>(dp, panel, bt + l0, kLanes, c, kLanes);
      else
        attn_mm::mm<W, T, NV, P, 1, false>(dp, panel, bt + l0, kLanes, c, kLanes);
    });
  }
}

// The last R (< kPanel) rows of accessor_times_lanes: a micro-kernel of exactly R rows (reading
// past them would leave the tensor).
template <int W, int R, bool kAccumulate, class A>
void tail_times_lanes(int64_t r, int64_t kdim, A a, const float* b, float* c, int lanes) {
  if constexpr (R > 0) {
    if (r != R) return tail_times_lanes<W, R - 1, kAccumulate>(r, kdim, a, b, c, lanes);
    for_lane_chunks<W>(lanes, [&](int l0, auto nv) {
      attn_mm::mm_with<W, R, decltype(nv)::value, kAccumulate>(kdim, a, b + l0, kLanes, c + l0,
                                                                kLanes);
    });
  }
}

// c[r][lane] (+)= sum_k A(k, r) b[k][lane] for r < rows (exactly those rows are written), in
// kPanel-row micro-kernels; at(r0) is the accessor of rows r0.. (an fp32 operand read in place).
template <int W, bool kAccumulate, class At>
void accessor_times_lanes(int64_t rows, int64_t kdim, At at, const float* b, float* c,
                          int lanes) {
  constexpr int P = Shape<W>::kPanel;
  int64_t r0 = 0;
  for (; r0 + P <= rows; r0 += P)
    for_lane_chunks<W>(lanes, [&](int l0, auto nv) {
      attn_mm::mm_with<W, P, decltype(nv)::value, kAccumulate>(kdim, at(r0), b + l0, kLanes,
                                                                c + r0 * kLanes + l0, kLanes);
    });
  if (r0 < rows)
    tail_times_lanes<W, P - 1, kAccumulate>(rows - r0, kdim, at(r0), b, c + r0 * kLanes, lanes);
}

// ot[d][lane] (+)= sum_k v[k * ldv + d] * pt[k][lane] for d < dp, k < kdim: the forward's
// O += P V kept transposed (O^T += V^T P^T), so that it runs the S^T kernel's shape (kPanel
// columns of V broadcast against the 32 query lanes: 24 accumulators, 2 loads per 24 FMAs;
// O = P V row by row took 8 rows x 2 vectors, 10 loads per 16 FMAs, ~20% slower) and the
// online softmax's rescale of O is lane-wise. The sums are the same products in the same order.
template <int W, bool kAccumulate>
void matrix_t_times_lanes(int64_t kdim, const float* v, int64_t ldv, int64_t dp, const float* pt,
                          float* ot, int lanes) {
  accessor_times_lanes<W, kAccumulate>(
      dp, kdim, [=](int64_t d0) { return attn_mm::KStride{v + d0, ldv}; }, pt, ot, lanes);
}

// panels_times_lanes with the keys read in place: st[j][lane] = sum_d k[j * ldk + d] *
// bt[d][lane] for j < count (exactly those rows are written), k the block's fp32 rows.
template <int W>
void rows_times_lanes(const float* k, int64_t ldk, int64_t dp, int64_t count, const float* bt,
                      float* st, int lanes) {
  accessor_times_lanes<W, false>(
      count, dp, [=](int64_t j0) { return attn_mm::RowStride{k + j0 * ldk, ldk}; }, bt, st,
      lanes);
}

// o[lane][d] = ot[d][lane] for d < dp (a multiple of W) and lane < lanes: 16 x 16 register
// transposes on AVX-512, scalar otherwise.
template <int W>
void lanes_to_rows(const float* ot, int64_t dp, float* o, int lanes) {
  if constexpr (W == 16) {
    const float* rows[16];
    for (int64_t d0 = 0; d0 < dp; d0 += 16) {
      for (int r = 0; r < 16; ++r) rows[r] = ot + (d0 + r) * kLanes;
      for (int l0 = 0; l0 < lanes; l0 += 16) transpose16(rows, l0, 1.0f, o + l0 * dp + d0, dp);
    }
  } else {
    for (int64_t d = 0; d < dp; ++d)
      for (int l = 0; l < lanes; ++l) o[l * dp + d] = ot[d * kLanes + l];
  }
}

}  // namespace attn_cpu
}  // namespace IMGTX_CPU_NS
}  // namespace imgtx
