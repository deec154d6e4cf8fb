// Emulated twins of the PTX instructions our kernels issue (called only from the one wrapper
// header, csrc/common/ptx.cuh). Fragment layouts are the PTX ISA's ("Matrix Fragments for
// mma.m16n8k16" / "mma.m16n8k8" with .f16/.bf16/.tf32, and ldmatrix's "m8n8" row distribution);
// tests/cpp/test_simt_ptx.cpp checks them against those tables, written out independently.
#pragma once

#include <cstdint>

#include "simt/simt.h"

namespace simt {
namespace ptx {

enum class MmaType { kF16, kBF16, kTF32 };

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 d, a, b, c with d == c:
// c[4] (fp32 accumulators, in/out), a[4] and b0, b1 (packed pairs). Warp-wide (all 32 lanes).
void mma_m16n8k16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, MmaType type, Site site);
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: a[4], b0, b1 hold tf32 values in b32
// registers (the low 13 mantissa bits are ignored, as the hardware does).
void mma_m16n8k8_tf32(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, Site site);
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8 (16 bytes, 16-byte aligned, in shared memory); r[j] receives matrix j.
void ldmatrix_x4(uint32_t* r, const void* row, bool trans, Site site);
// cp.async.cg.shared.global [dst], [src], 16, src_bytes: src_bytes (0 or 16) bytes are copied
// and the rest zero-filled. The bytes land at the cp.async.wait_group that covers their group;
// until then the destination reads as poison.
void cp_async_cg16(void* dst, const void* src, int src_bytes, Site site);
void cp_async_commit(Site site);
void cp_async_wait(int pending_groups, Site site);

}  // namespace ptx
}  // namespace simt
