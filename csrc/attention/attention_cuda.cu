// Host side of the CUDA attention (API: imgtx/attention.h), plus the small helper kernels.
//
// Forward: attn_fwd_kernel<D, T> (attention_cuda_fwd.cuh), one CTA per (batch, head chunk, query
// tile of the block-sparse plan, key split). For q_len <= 4 (KV-cache decoding) the "decode"
// configuration packs the query heads of a kv head into one CTA (hpack) and splits the key
// blocks over CTAs (splits, flash-decoding); attn_combine_kernel then merges the partial
// (m, l, o) of the splits from the workspace into out and lse.
// Backward: attn_bwd_kernel<D, T> (attention_cuda_bwd.cuh), one CTA per (batch, head, query
// tile): dQ stays in registers (each query row belongs to exactly one CTA, so it is written,
// not accumulated), dK/dV are accumulated with atomics into fp32 workspace buffers (they sum
// over query tiles and over the query heads of a kv head), then attn_convert_kernel writes them
// in the inputs' dtype through the AttnOutput strides.
// Every call is asynchronous on the given stream, never synchronises the host and never
// allocates (graph-capturable); the only non-stream calls are cudaFuncSetAttribute (dynamic
// shared memory opt-in) inside the launchers.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention/attention_cuda_common.cuh"
#include "common/cuda_check.h"
#include "common/cuda_dtype.cuh"
#include "imgtx/attention.h"

namespace imgtx {
namespace attn_cuda {
namespace {

constexpr int64_t kTargetCtas = 256;  // decode: split keys until about this many CTAs
constexpr int kMaxSplits = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align256(size_t x) { return (x + 255) / 256 * 256; }

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("attention (CUDA): " + what);
}

bool dims_supported(int64_t d) { return d == 32 || d == 64 || d == 96 || d == 128; }

MaskArgs make_mask(const AttnMask& m) {
  MaskArgs a;
  a.data = m.data;
  a.kind = int(m.kind);
  a.dtype = m.dtype;
  a.sb = m.stride_batch;
  a.sh = m.stride_head;
  a.sq = m.stride_q;
  a.sk = m.stride_k;
  return a;
}

TensorArgs tensor(const AttnTensor& t) { return {t.data, t.stride_batch, t.stride_head, t.stride_row}; }
OutArgs output(const AttnOutput& t) { return {t.data, t.stride_batch, t.stride_head, t.stride_row}; }

// Rows of a (batch, head, row, dim) operand can be copied 16 bytes at a time.
bool rows_aligned(const void* data, int64_t sb, int64_t sh, int64_t sr) {
  return reinterpret_cast<uintptr_t>(data) % 16 == 0 && sb % 8 == 0 && sh % 8 == 0 && sr % 8 == 0;
}

template <class T>
struct TypeTag {
  typedef T type;
};

// fn(std::integral_constant<int, D>, TypeTag<T>) for the call's head dim and dtype.
template <class Fn>
void dispatch(int64_t d, DType t, Fn&& fn) {
  const bool bf = t == DType::kBFloat16;
  const TypeTag<__half> h;
  const TypeTag<__nv_bfloat16> b;
  switch (d) {
    case 32: bf ? fn(std::integral_constant<int, 32>(), b) : fn(std::integral_constant<int, 32>(), h); break;
    case 64: bf ? fn(std::integral_constant<int, 64>(), b) : fn(std::integral_constant<int, 64>(), h); break;
    case 96: bf ? fn(std::integral_constant<int, 96>(), b) : fn(std::integral_constant<int, 96>(), h); break;
    case 128: bf ? fn(std::integral_constant<int, 128>(), b) : fn(std::integral_constant<int, 128>(), h); break;
    default: fail("unsupported head dim " + std::to_string(d));
  }
}

// The launch configuration of the forward (shared by the workspace query and the call).
struct FwdConfig {
  DevPlan plan;
  int hpack = 1;
  int64_t cpg = 1;
  int splits = 1;
  int64_t ctas = 0;
  size_t workspace = 0;
};

FwdConfig fwd_config(const AttnParams& p) {
  FwdConfig c;
  const int64_t group = p.heads / p.kv_heads;
  if (p.q_len <= kDecodeMaxQueries) {
    const int64_t tile_rows = std::max<int64_t>(p.q_len, 1);
    c.plan = make_plan(p, tile_rows);
    c.hpack = int(std::min<int64_t>(group, kBM / tile_rows));
    c.cpg = ceil_div(group, c.hpack);
    const int64_t base = p.batch * p.kv_heads * c.cpg * c.plan.tiles;
    const int64_t want = ceil_div(kTargetCtas, std::max<int64_t>(base, 1));
    const int64_t useful = std::max<int64_t>(1, ceil_div(p.k_len, 2 * kBN));
    c.splits = int(std::max<int64_t>(1, std::min<int64_t>({want, useful, kMaxSplits})));
  } else {
    c.plan = make_plan(p, kBM);
    c.hpack = 1;
    c.cpg = group;
    c.splits = 1;
  }
  c.ctas = p.batch * p.kv_heads * c.cpg * c.plan.tiles * c.splits;
  if (c.splits > 1)
    c.workspace = align256(size_t(p.batch * p.heads * p.q_len) * size_t(c.splits) *
                           size_t(p.head_dim + 2) * sizeof(float));
  return c;
}

// Merges the splits' partial (m, l, o) of one query row per warp.
template <class T>
__global__ void __launch_bounds__(128) attn_combine_kernel(const float* partial, int splits, int D,
                                                           int64_t rows, int64_t heads, int64_t nq,
                                                           OutArgs out, float* lse) {
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float* base = partial + row * splits * (D + 2);
  float M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmaxf(M, base[s * (D + 2)]);
  const float use = M == -INFINITY ? 0.f : M;
  float L = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};  // D <= 128: 4 per lane
  for (int s = 0; s < splits; ++s) {
    const float* pr = base + s * (D + 2);
    if (pr[1] == 0.f) continue;  // a split that saw no key
    const float w = exp2f(pr[0] - use);
    L += pr[1] * w;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (lane + 32 * k < D) acc[k] += pr[2 + lane + 32 * k] * w;
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  const int64_t i = row % nq, bh = row / nq, h = bh % heads, b = bh / heads;
  const int64_t ob = b * out.sb + h * out.sh + i * out.sr;
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (lane + 32 * k < D) TypeOps<T>::store(out.data, ob + lane + 32 * k, acc[k] * inv);
  if (lse && lane == 0) lse[row] = L > 0.f ? use * kLn2 + logf(L) : (isnan(L) ? L : kLseEmpty);
}

// dst[b, g, j, :D] = acc[((b * kv_heads + g) * nk + j) * D + :D] in T.
template <class T>
__global__ void attn_convert_kernel(const float* acc, int64_t total, int D, int64_t kv_heads,
                                    int64_t nk, OutArgs dst) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = e % D, row = e / D;
    const int64_t j = row % nk, bg = row / nk, g = bg % kv_heads, b = bg / kv_heads;
    TypeOps<T>::store(dst.data, b * dst.sb + g * dst.sh + j * dst.sr + d, acc[e]);
  }
}

void check_ctas(int64_t ctas) {
  if (ctas >= (int64_t(1) << 31)) fail("problem too large for one launch (2^31 CTAs)");
}

// validate() range-checks key_lengths by reading it on the host, but here it is a DEVICE
// pointer (dereferencing it on the host crashes, and copying it back would synchronise).
// Validate everything else; the kernels clip key_lengths[b] to k_len (make_tile) and a
// negative length gives empty key segments, i.e. no visible key.
void validate_device_params(const AttnParams& p) {
  AttnParams host = p;  // slices off the forward/backward parts (validate only reads these)
  host.key_lengths = nullptr;
  validate(host);
}

}  // namespace
}  // namespace attn_cuda

using namespace attn_cuda;

namespace {

// Shared memory one pass needs at head dim d (the backward's is the larger).
template <int D>
int pass_smem(AttnPass pass) {
  return pass == AttnPass::kBackward ? bwd_smem_bytes<D>() : fwd_smem_bytes<D>();
}

int smem_needed(int64_t d, AttnPass pass) {
  switch (d) {
    case 32: return pass_smem<32>(pass);
    case 64: return pass_smem<64>(pass);
    case 96: return pass_smem<96>(pass);
    default: return pass_smem<128>(pass);
  }
}

// The current device's opt-in shared memory per block: 227 KB on A100/H100, but 99 KB on
// sm_86/sm_89 cards (RTX 30xx/40xx, A10, L4, L40), which the 80-real build also runs on and
// where the D = 128 backward (122 KB) cannot launch while its forward (87 KB) can. Each pass
// decides alone; a pass that does not fit takes the torch path instead.
int device_smem_optin() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();  // clear: the caller falls back
    return 0;
  }
  return bytes;
}

}  // namespace

bool attention_cuda_supported(const AttnParams& p, AttnPass pass) {
  if (p.q.dtype != DType::kFloat16 && p.q.dtype != DType::kBFloat16) return false;
  if (p.head_dim != p.v_dim || !dims_supported(p.head_dim)) return false;
  if (smem_needed(p.head_dim, pass) > device_smem_optin()) return false;
  if (p.mask.kind == AttnMaskKind::kAdditive && p.mask.dtype != DType::kFloat32 &&
      p.mask.dtype != DType::kFloat16 && p.mask.dtype != DType::kBFloat16)
    return false;
  return true;
}

size_t attention_forward_cuda_workspace_size(const AttnForwardParams& p) {
  validate_device_params(p);
  if (!attention_cuda_supported(p, AttnPass::kForward) || p.batch * p.heads * p.q_len == 0)
    return 0;
  return fwd_config(p).workspace;
}

void attention_forward_cuda(const AttnForwardParams& p, void* workspace, void* stream) {
  validate_device_params(p);
  if (!attention_cuda_supported(p, AttnPass::kForward))
    fail("unsupported call (needs fp16/bf16 and head_dim == v_dim in {32, 64, 96, 128})");
  if (p.batch * p.heads * p.q_len == 0) return;
  if (!p.out.data) fail("out is a null pointer");
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const FwdConfig c = fwd_config(p);
  if (c.workspace && !workspace) fail("workspace is a null pointer");
  check_ctas(c.ctas);
  FwdArgs a;
  a.plan = c.plan;
  a.q = tensor(p.q);
  a.k = tensor(p.k);
  a.v = tensor(p.v);
  a.out = output(p.out);
  a.lse = p.lse;
  a.mask = make_mask(p.mask);
  a.batch = p.batch;
  a.heads = p.heads;
  a.kv_heads = p.kv_heads;
  a.group = p.heads / p.kv_heads;
  a.scale_log2 = p.scale * kLog2e;
  a.aligned = rows_aligned(p.q.data, p.q.stride_batch, p.q.stride_head, p.q.stride_row) &&
              (p.k_len == 0 ||
               (rows_aligned(p.k.data, p.k.stride_batch, p.k.stride_head, p.k.stride_row) &&
                rows_aligned(p.v.data, p.v.stride_batch, p.v.stride_head, p.v.stride_row)));
  a.hpack = c.hpack;
  a.cpg = c.cpg;
  a.splits = c.splits;
  a.partial = c.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  if (p.k_len == 0) {  // no key at all: every query is empty (the kernel never touches k/v)
    a.k.data = a.v.data = p.q.data;
  }
  dispatch(p.head_dim, p.q.dtype, [&](auto dim, auto tag) {
    constexpr int D = decltype(dim)::value;
    typedef typename decltype(tag)::type T;
    launch_fwd<D, T>(a, c.ctas, st);
    if (c.splits > 1) {
      const int64_t rows = p.batch * p.heads * p.q_len;
      IMGTX_LAUNCH(unsigned(ceil_div(rows, 4)), 128, 0, st, attn_combine_kernel<T>)(
          a.partial, c.splits, D, rows, p.heads, p.q_len, a.out, p.lse);
      check_last_launch("attention attn_combine_kernel");
    }
  });
}

size_t attention_backward_cuda_workspace_size(const AttnBackwardParams& p) {
  validate_device_params(p);
  if (!attention_cuda_supported(p, AttnPass::kBackward)) return 0;
  const size_t acc = size_t(p.batch * p.kv_heads * p.k_len * p.head_dim) * sizeof(float);
  return 2 * align256(acc);
}

void attention_backward_cuda(const AttnBackwardParams& p, void* workspace, void* stream) {
  validate_device_params(p);
  if (!attention_cuda_supported(p, AttnPass::kBackward))
    fail("unsupported call (needs fp16/bf16 and head_dim == v_dim in {32, 64, 96, 128})");
  if (p.batch * p.heads * p.q_len == 0 || p.k_len == 0)
    fail("backward needs at least one query and one key (the caller zero-fills empty cases)");
  if (!p.lse || !p.out.data || !p.grad_out.data || !p.grad_q.data || !p.grad_k.data ||
      !p.grad_v.data)
    fail("backward has a null pointer argument");
  if (!workspace) fail("workspace is a null pointer");
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t D = p.head_dim;
  const size_t acc_bytes = size_t(p.batch * p.kv_heads * p.k_len * D) * sizeof(float);
  float* dk = static_cast<float*>(workspace);
  float* dv = reinterpret_cast<float*>(static_cast<char*>(workspace) + align256(acc_bytes));
  IMGTX_CUDA_CHECK(cudaMemsetAsync(workspace, 0, 2 * align256(acc_bytes), st));

  BwdArgs a;
  a.plan = make_plan(p, kBM);
  a.q = tensor(p.q);
  a.k = tensor(p.k);
  a.v = tensor(p.v);
  a.out = tensor(p.out);
  a.dout = tensor(p.grad_out);
  a.dq = output(p.grad_q);
  a.lse = p.lse;
  a.dlse = p.grad_lse;
  a.dk_acc = dk;
  a.dv_acc = dv;
  a.mask = make_mask(p.mask);
  a.batch = p.batch;
  a.heads = p.heads;
  a.kv_heads = p.kv_heads;
  a.group = p.heads / p.kv_heads;
  a.scale = p.scale;
  a.scale_log2 = p.scale * kLog2e;
  a.aligned = rows_aligned(p.q.data, p.q.stride_batch, p.q.stride_head, p.q.stride_row) &&
              rows_aligned(p.k.data, p.k.stride_batch, p.k.stride_head, p.k.stride_row) &&
              rows_aligned(p.v.data, p.v.stride_batch, p.v.stride_head, p.v.stride_row) &&
              rows_aligned(p.grad_out.data, p.grad_out.stride_batch, p.grad_out.stride_head,
                           p.grad_out.stride_row);
  const int64_t ctas = p.batch * p.heads * a.plan.tiles;
  check_ctas(ctas);
  const int64_t total = p.batch * p.kv_heads * p.k_len * D;
  const unsigned cgrid = unsigned(std::min<int64_t>(ceil_div(total, 256), 4096));
  dispatch(D, p.q.dtype, [&](auto dim, auto tag) {
    constexpr int DD = decltype(dim)::value;
    typedef typename decltype(tag)::type T;
    launch_bwd<DD, T>(a, ctas, st);
    IMGTX_LAUNCH(cgrid, 256, 0, st, attn_convert_kernel<T>)(dk, total, int(D), p.kv_heads, p.k_len,
                                                  output(p.grad_k));
    check_last_launch("attention attn_convert_kernel (dK)");
    IMGTX_LAUNCH(cgrid, 256, 0, st, attn_convert_kernel<T>)(dv, total, int(D), p.kv_heads, p.k_len,
                                                  output(p.grad_v));
    check_last_launch("attention attn_convert_kernel (dV)");
  });
}

}  // namespace imgtx
