// C++ API of the codebook-lookup family (VQ nearest-code search).
//
// Framework-free: raw pointers, sizes, strides (in elements), and on CUDA a stream.
// Semantics (identical on every backend):
//   metric kL2:     index = argmin_k |z_n - c_k|^2            quantized = c_idx
//   metric kCosine: index = argmax_k z_n . c_k / max(|c_k|, 1e-12)   quantized = that unit code
//   The index is the exact argmin of the float64 distance; exact ties go to the lowest index.
//   Codes containing NaN/Inf are never selected. A row of z containing NaN/Inf gets index 0.
//   sqdist[n] = sum_d (z[n,d] - quantized[n,d])^2, quantized as written (rounded to z's dtype),
//   accumulated in fp64 and returned as fp32.
//   counts[k] += number of rows whose index is k (counts must be zeroed by the caller).
#pragma once

#include <cstddef>
#include <cstdint>

#include "imgtx/dtype.h"

namespace imgtx {

enum class CodebookMetric : int { kL2 = 0, kCosine = 1 };

struct CodebookLookupParams {
  // z viewed as (batch, rows, dim) with arbitrary strides: covers any leading shape whose
  // dims collapse to two (e.g. a (B, C, H, W) tensor permuted to (B, H, W, C)).
  const void* z = nullptr;
  DType z_dtype = DType::kFloat32;
  int64_t batch = 0, rows = 0, dim = 0;
  int64_t z_stride_batch = 0, z_stride_row = 0, z_stride_dim = 1;

  const void* codebook = nullptr;  // (num_codes, dim), arbitrary strides
  DType codebook_dtype = DType::kFloat32;
  int64_t num_codes = 0;
  int64_t cb_stride_code = 0, cb_stride_dim = 1;

  CodebookMetric metric = CodebookMetric::kL2;

  // Outputs, all contiguous over n = b * rows + r. Any of them but `indices` may be null.
  int64_t* indices = nullptr;  // (batch * rows)
  void* quantized = nullptr;   // (batch * rows, dim) in z_dtype
  float* sqdist = nullptr;     // (batch * rows)
  int64_t* counts = nullptr;   // (num_codes), accumulated into
};

// Throws std::invalid_argument on bad sizes (the Python layer checks first; this is the
// last line of defence for callers of the C++ API).
void validate(const CodebookLookupParams& p);

// CPU: uses up to `num_threads` threads of the library's pool (the caller passes
// torch.get_num_threads()). Extra memory: the packed fp32 codebook (K * D * 4 bytes) plus
// O(threads * block) scratch; never an N x K buffer.
void codebook_lookup_cpu(const CodebookLookupParams& p, int num_threads);

// Process-wide counters of the exactness machinery (for tests and benchmarks): rows whose fast
// argmin was not certified and were re-checked in float64 over their candidate codes, those
// candidate codes, and rows re-searched over every code (non-finite rows, possible fp32
// overflow). The CPU path always counts; the CUDA path counts into its workspace and adds to
// these only when IMGTX_FAST_CODEBOOK_STATS=1 (a synchronising read-back after each call).
struct CodebookCounters {
  int64_t rows_rechecked = 0;
  int64_t rows_full_search = 0;
  int64_t codes_rechecked = 0;
};
CodebookCounters codebook_counters();
void reset_codebook_counters();
void add_codebook_counters(const CodebookCounters& c);

// CUDA: the fast pass runs on tensor cores (3xTF32 mma.sync) on sm_80 and newer, else (or with
// IMGTX_FAST_CODEBOOK_SIMT=1) as an fp32 SIMT GEMM; the outputs are the same either way.
// All pointers are device pointers; `workspace` is a device buffer of at least
// codebook_lookup_cuda_workspace_size(p) bytes, 256-byte aligned (the caller allocates it,
// so it comes from the framework's caching allocator; it holds two fp32 planes of the padded
// codebook, ~8 K D bytes, plus O(N) scratch). Asynchronous on `stream`; launch errors are thrown
// as std::runtime_error. Capturable in a CUDA graph (not with IMGTX_FAST_CODEBOOK_STATS=1).
size_t codebook_lookup_cuda_workspace_size(const CodebookLookupParams& p);
void codebook_lookup_cuda(const CodebookLookupParams& p, void* workspace, void* stream);

}  // namespace imgtx
