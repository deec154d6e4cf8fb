// Validation and run-time ISA dispatch of the CPU attention kernels (the hot code lives in
// attention_cpu_{forward,backward}.h, compiled once per ISA file).
#include <stdexcept>
#include <string>

#include "common/cpu_features.h"
#include "imgtx/attention.h"

namespace imgtx {

void attention_forward_cpu_portable(const AttnForwardParams& p, int num_threads);
void attention_backward_cpu_portable(const AttnBackwardParams& p, int num_threads);
#ifdef IMGTX_HAVE_X86_KERNELS
void attention_forward_cpu_avx2(const AttnForwardParams& p, int num_threads);
void attention_backward_cpu_avx2(const AttnBackwardParams& p, int num_threads);
void attention_forward_cpu_avx512(const AttnForwardParams& p, int num_threads);
void attention_backward_cpu_avx512(const AttnBackwardParams& p, int num_threads);
#endif

namespace {

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("attention: " + what);
}

void check_tensor(const AttnTensor& t, const char* name) {
  if (!t.data) fail(std::string(name) + " is a null pointer");
}

}  // namespace

void validate(const AttnParams& p) {
  if (p.batch < 0 || p.heads < 0 || p.q_len < 0 || p.k_len < 0)
    fail("negative size");
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0)
    fail("kv heads (" + std::to_string(p.kv_heads) + ") must divide heads (" +
         std::to_string(p.heads) + ")");
  if (p.head_dim < 1 || p.head_dim > kAttnMaxHeadDim || p.v_dim < 1 || p.v_dim > kAttnMaxHeadDim)
    fail("head dims must be in [1, 256], got " + std::to_string(p.head_dim) + " and " +
         std::to_string(p.v_dim));
  if (p.q_len >= (int64_t(1) << 31) || p.k_len >= (int64_t(1) << 31))
    fail("sequence lengths must be < 2^31");
  if (!(p.scale == p.scale)) fail("scale is NaN");
  if (p.batch * p.heads * p.q_len == 0) return;
  check_tensor(p.q, "q");
  if (p.k_len > 0) {
    check_tensor(p.k, "k");
    check_tensor(p.v, "v");
    if (p.k.dtype != p.q.dtype || p.v.dtype != p.q.dtype) fail("q, k and v must share a dtype");
  }
  if (p.key_lengths)
    for (int64_t b = 0; b < p.batch; ++b)
      if (p.key_lengths[b] < 0 || p.key_lengths[b] > p.k_len)
        fail("key_lengths must be in [0, k_len]");
  if (p.mask.kind != AttnMaskKind::kNone && !p.mask.data) fail("attn_mask is a null pointer");
  const AttnPattern& pat = p.pattern;
  switch (pat.kind) {
    case AttnPatternKind::kDense: break;
    case AttnPatternKind::kLocal1d:
      if (pat.block <= 0 || pat.filter_width < 0) fail("Local1d needs block > 0, filter_width >= 0");
      if (p.causal) fail("a pattern carries its own causality");
      if (pat.causal ? p.q_len > p.k_len : p.q_len != p.k_len)
        fail("Local1d: bad query/key lengths");
      break;
    case AttnPatternKind::kLocal2d:
      if (pat.height <= 0 || pat.width <= 0 || pat.query_h <= 0 || pat.query_w <= 0 ||
          pat.flange_h < 0 || pat.flange_w < 0)
        fail("Local2d needs positive image and query sizes and non-negative flanges");
      if (p.causal) fail("a pattern carries its own causality");
      if (pat.causal ? (p.k_len > pat.height * pat.width || p.q_len > p.k_len)
                     : (p.q_len != pat.height * pat.width || p.k_len != p.q_len))
        fail("Local2d: height * width does not match the sequence lengths");
      break;
    default: fail("unknown pattern kind");
  }
}

void attention_forward_cpu(const AttnForwardParams& p, int num_threads) {
  validate(p);
  if (p.batch * p.heads * p.q_len == 0) return;
  if (!p.out.data) fail("out is a null pointer");
  switch (active_cpu_isa()) {
#ifdef IMGTX_HAVE_X86_KERNELS
    case CpuIsa::kAvx512: return attention_forward_cpu_avx512(p, num_threads);
    case CpuIsa::kAvx2: return attention_forward_cpu_avx2(p, num_threads);
#endif
    default: return attention_forward_cpu_portable(p, num_threads);
  }
}

void attention_backward_cpu(const AttnBackwardParams& p, int num_threads) {
  validate(p);
  if (p.batch * p.heads * p.q_len == 0 || p.k_len == 0)
    fail("backward needs at least one query and one key (the caller zero-fills empty cases)");
  if (!p.lse || !p.out.data || !p.grad_out.data || !p.grad_q.data || !p.grad_k.data ||
      !p.grad_v.data)
    fail("backward has a null pointer argument");
  switch (active_cpu_isa()) {
#ifdef IMGTX_HAVE_X86_KERNELS
    case CpuIsa::kAvx512: return attention_backward_cpu_avx512(p, num_threads);
    case CpuIsa::kAvx2: return attention_backward_cpu_avx2(p, num_threads);
#endif
    default: return attention_backward_cpu_portable(p, num_threads);
  }
}

}  // namespace imgtx
