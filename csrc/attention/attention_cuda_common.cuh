// Shared pieces of the CUDA attention kernels (semantics: imgtx/attention.h).
//
// - Tensor-core helpers over common/ptx.cuh (the PTX wrappers): mma.sync m16n8k16 per dtype,
//   ldmatrix (plain and .trans), cp.async 16-byte copies with zero fill (for padding key rows).
// - The device-side block-sparse plan. It MIRRORS csrc/attention/attention_plan.cpp (keep the two
//   in sync): the same query tiles (dense: runs of tile_rows rows; Local1d: runs that never
//   straddle a block; Local2d: the pixels of one image tile, in the tile's raster order, cut in
//   chunks of tile_rows) and the same key segments per tile. One difference of representation:
//   a Local1d causal tile's "previous block" + "own block" segments, and a Local2d causal row's
//   "left flange" + "own tile" segments, are contiguous in key rows and are merged here into one
//   segment whose keys at rows >= `cf` are causal (kpos = kb + row - cf) and plain before.
//   That visits the same keys in the same order with the same visibility rule.
// - Kernels walk the concatenated segments in key blocks of kBN keys; a block's key rows and
//   positions are written to shared memory and K/V rows are gathered by index (so Local2d's
//   row strips cost the same as contiguous keys). Visibility of key j for query q:
//   key row valid (inside the segments) && (kpos == kPlainKey || kpos <= qpos) && mask.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "attention/attention_plan_device.h"
#include "common/cuda_dtype.cuh"
#include "common/cuda_kernel.cuh"
#include "common/ptx.cuh"
#include "imgtx/attention.h"

namespace imgtx {
namespace attn_cuda {

constexpr int kBM = 64;        // query rows per CTA (4 warps x 16 rows)
constexpr int kBN = 64;        // keys per key block
constexpr int kThreads = 128;  // 4 warps
constexpr int kDecodeMaxQueries = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- shared memory per CTA (the smem layouts are described in the kernels' files) ----------
template <int D>
constexpr int fwd_smem_bytes() {
  return (kBM + 4 * kBN) * (D + 8) * 2 + (4 * kBN + 3 * kBM) * 4;
}
template <int D>
constexpr int bwd_smem_bytes() {
  return (2 * kBM + 4 * kBN) * (D + 8) * 2 + 2 * kBM * (kBN + 8) * 2 + (4 * kBN + 2 * kBM) * 4 +
         2 * kBM * 4;
}

// ---- mask ---------------------------------------------------------------------------------
struct MaskArgs {
  const void* data = nullptr;
  int kind = 0;  // AttnMaskKind
  DType dtype = DType::kFloat32;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
};

// Applies the user mask to x (log2-domain score) of key row j for a query whose mask row starts
// at element `rowbase`. Returns false when the key is masked out.
__device__ __forceinline__ bool apply_user_mask(const MaskArgs& m, int64_t rowbase, int j,
                                                float& x) {
  const int64_t off = rowbase + int64_t(j) * m.sk;
  if (m.kind == int(AttnMaskKind::kBool))
    return __ldg(static_cast<const unsigned char*>(m.data) + off) != 0;
  x += load_any(m.dtype, m.data, off) * kLog2e;
  return true;
}

// ---- arguments ----------------------------------------------------------------------------
struct TensorArgs {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, sr = 0;
};
struct OutArgs {
  void* data = nullptr;
  int64_t sb = 0, sh = 0, sr = 0;
};

struct FwdArgs {
  DevPlan plan;
  TensorArgs q, k, v;
  OutArgs out;
  float* lse = nullptr;
  MaskArgs mask;
  int64_t batch = 0, heads = 0, kv_heads = 0, group = 0;
  float scale_log2 = 0.f;  // scale * log2(e)
  int aligned = 0;         // q/k/v rows 16-byte aligned: cp.async, else scalar loads
  // Query heads packed per CTA (decode: the group's heads share the kv head's keys; 1 else).
  int hpack = 1;
  int64_t cpg = 1;         // head chunks per kv head = ceil(group / hpack)
  int splits = 1;          // key splits (flash-decoding); partial != null when > 1
  float* partial = nullptr;  // [batch][heads][q_len][splits][D + 2]: (m log2, l, o[D])
};

struct BwdArgs {
  DevPlan plan;
  TensorArgs q, k, v, out, dout;
  OutArgs dq;
  const float* lse = nullptr;
  const float* dlse = nullptr;
  float* dk_acc = nullptr;  // [batch][kv_heads][k_len][D] fp32, zeroed
  float* dv_acc = nullptr;
  MaskArgs mask;
  int64_t batch = 0, heads = 0, kv_heads = 0, group = 0;
  float scale = 0.f, scale_log2 = 0.f;
  int aligned = 0;
};

template <int D, class T>
void launch_fwd(const FwdArgs& a, int64_t ctas, cudaStream_t stream);
template <int D, class T>
void launch_bwd(const BwdArgs& a, int64_t ctas, cudaStream_t stream);

// ---- tensor-core and copy primitives -----------------------------------------------------
// The fp16 and bf16 kernels differ in three one-liners (the pair conversion, the mma, the element
// access); TypeOps<T> writes everything else once.
__device__ __forceinline__ __half2 float_pair(float a, float b, __half) { return __floats2half2_rn(a, b); }
__device__ __forceinline__ __nv_bfloat162 float_pair(float a, float b, __nv_bfloat16) {
  return __floats2bfloat162_rn(a, b);
}
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1,
                                          __half IMGTX_PTX_SITE_ARGS) {
  ptx::mma_m16n8k16_f16(c, a, b0, b1 IMGTX_PTX_SITE_FORWARD);
}
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1,
                                          __nv_bfloat16 IMGTX_PTX_SITE_ARGS) {
  ptx::mma_m16n8k16_bf16(c, a, b0, b1 IMGTX_PTX_SITE_FORWARD);
}
template <class T>
struct ElementOf;
template <>
struct ElementOf<__half> {
  typedef F16 type;
};
template <>
struct ElementOf<__nv_bfloat16> {
  typedef BF16 type;
};

template <class T>
struct TypeOps {
  typedef typename ElementOf<T>::type Elem;
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    const auto h = float_pair(a, b, T());
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1 IMGTX_PTX_SITE_ARGS) {
    mma_16816(c, a, b0, b1, T() IMGTX_PTX_SITE_FORWARD);
  }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) { Elem::store(p, i, v); }
  static __device__ __forceinline__ float load(const void* p, int64_t i) { return Elem::load(p, i); }
};

__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p IMGTX_PTX_SITE_ARGS) {
  ptx::ldmatrix_x4(r, p, false IMGTX_PTX_SITE_FORWARD);
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, const void* p IMGTX_PTX_SITE_ARGS) {
  ptx::ldmatrix_x4(r, p, true IMGTX_PTX_SITE_FORWARD);
}

// 16 bytes global -> shared; src_bytes = 0 writes zeros (src must still be a valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid IMGTX_PTX_SITE_ARGS) {
  ptx::cp_async_cg16(dst, src, valid ? 16 : 0 IMGTX_PTX_SITE_FORWARD);
}
__device__ __forceinline__ void cp_async_commit(IMGTX_PTX_SITE_ARGS_FIRST) {
  ptx::cp_async_commit(IMGTX_PTX_SITE_FORWARD_FIRST);
}
template <int N>
__device__ __forceinline__ void cp_async_wait(IMGTX_PTX_SITE_ARGS_FIRST) {
  ptx::cp_async_wait<N>(IMGTX_PTX_SITE_FORWARD_FIRST);
}

// Copies 8 elements (16 bytes) of a row into shared memory: cp.async when the source is 16-byte
// aligned, else 8 scalar loads (any stride, any base alignment). Zeros when !valid.
__device__ __forceinline__ void load_chunk(void* dst, const void* base, int64_t off, bool valid,
                                           bool aligned IMGTX_PTX_SITE_ARGS) {
  const unsigned short* src = static_cast<const unsigned short*>(base) + (valid ? off : 0);
  if (aligned) {
    cp_async16(dst, src, valid IMGTX_PTX_SITE_FORWARD);
    return;
  }
  uint4 v = make_uint4(0, 0, 0, 0);
  if (valid) {
    unsigned short e[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = __ldg(src + i);
    v.x = e[0] | (uint32_t(e[1]) << 16);
    v.y = e[2] | (uint32_t(e[3]) << 16);
    v.z = e[4] | (uint32_t(e[5]) << 16);
    v.w = e[6] | (uint32_t(e[7]) << 16);
  }
  *static_cast<uint4*>(dst) = v;
}

// Copies rows into [rows][D + 8] shared tiles, 8 elements per chunk: row r of `dst` comes from
// element offset row_offset(r) of `data`, or is zeros when that is negative (padding rows).
// load_tile_pair fills two tiles in one loop (K and V, Q and dO): their chunk offsets are
// computed once, which keeps the backward's register count where it was before the loaders
// were shared. Threads split the chunks; cp.async when `aligned` (the caller commits).
template <int D, class T, class RowOffset>
__device__ __forceinline__ void load_tile(T* dst, int rows, const void* data, RowOffset row_offset,
                                          bool aligned) {
  for (int e = threadIdx.x; e < rows * (D / 8); e += kThreads) {
    const int r = e / (D / 8), c = e % (D / 8);
    const int64_t off = row_offset(r);
    load_chunk(dst + r * (D + 8) + c * 8, data, off < 0 ? 0 : off + c * 8, off >= 0, aligned);
  }
}
template <int D, class T, class RowOffsets>
__device__ __forceinline__ void load_tile_pair(T* dst_a, const void* a, T* dst_b, const void* b,
                                               int rows, RowOffsets row_offsets, bool aligned) {
  for (int e = threadIdx.x; e < rows * (D / 8); e += kThreads) {
    const int r = e / (D / 8), c = e % (D / 8);
    int64_t off_a, off_b;
    const bool valid = row_offsets(r, off_a, off_b);
    load_chunk(dst_a + r * (D + 8) + c * 8, a, valid ? off_a + c * 8 : 0, valid, aligned);
    load_chunk(dst_b + r * (D + 8) + c * 8, b, valid ? off_b + c * 8 : 0, valid, aligned);
  }
}

// Issues the K and V rows of one key block (krow[r] < 0: padding) into the double buffers.
template <int D, class T>
__device__ __forceinline__ void load_kv_block(T* sK, T* sV, const int* krow, const TensorArgs& k,
                                              const TensorArgs& v, int64_t kbase, int64_t vbase,
                                              bool aligned) {
  load_tile_pair<D>(sK, k.data, sV, v.data, kBN, [&](int r, int64_t& ok, int64_t& ov) {
    const int j = krow[r];
    ok = kbase + int64_t(j) * k.sr;
    ov = vbase + int64_t(j) * v.sr;
    return j >= 0;
  }, aligned);
}

// The query rows of a tile (R = heads x tile rows of them real): position in the sequence
// (sRowI), query head (sRowH, when packed heads share the CTA; may be null) and position for
// the causal rule (sRowQ). Padding rows: -1, h0, INT_MAX (they see everything, are never written).
__device__ __forceinline__ void fill_rows(const DevPlan& P, const Tile& tl, int R, int64_t h0,
                                          int* sRowI, int* sRowH, int* sRowQ) {
  for (int r = threadIdx.x; r < kBM; r += kThreads) {
    if (r < R) {
      int64_t i;
      int qp;
      tile_row(P, tl, r % tl.n, i, qp);
      sRowI[r] = int(i);
      if (sRowH) sRowH[r] = int(h0 + r / tl.n);
      sRowQ[r] = qp;
    } else {
      sRowI[r] = -1;
      if (sRowH) sRowH[r] = int(h0);
      sRowQ[r] = INT_MAX;
    }
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Fills the key indices of one block (threads 0..kBN-1, one key each) from the cursor, and
// returns (via the two barriers) whether no row of the tile can see the block (skip) and
// whether it needs per-element masking. Callers must ensure nobody still reads krow/kpos.
__device__ __forceinline__ void fill_block(const DevPlan& P, const Tile& T, int cs,
                                           int64_t co, int* krow, int* kpos, bool has_mask,
                                           bool& skip, bool& needmask) {
  const int tid = threadIdx.x;
  int invis = 1, part = 0;
  if (tid < kBN) {
    int row, kp;
    key_at(P, T, cs, co, tid, row, kp);
    krow[tid] = row;
    kpos[tid] = kp;
    invis = row < 0 || (kp != kPlainKey && kp > T.qmax);
    part = row < 0 || (kp != kPlainKey && kp > T.qmin);
  }
  skip = __syncthreads_and(invis) != 0;
  needmask = (__syncthreads_or(part) != 0) || has_mask;
}

}  // namespace attn_cuda
}  // namespace imgtx
