// The one place where CUDA kernels issue inline PTX: each instruction wrapped once, with its
// operand layout, and with an emulated twin (csrc/simt/ptx.cpp) used when the source is compiled
// by the host compiler against the emulator (IMGTX_SIMT). Kernels call these, never asm.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A 16x16 (row-major), a[0..3] = pairs (a0,a1) (a2,a3) (a4,a5) (a6,a7), low half first:
//     element i at row g + 8 ((i / 2) % 2), column 2 t + (i % 2) + 8 (i / 4)
//   B 16x8 (column-major), b0 = (b0,b1), b1 = (b2,b3): element i at row 2 t + (i % 2) + 8 (i / 2),
//     column g
//   C/D 16x8 fp32, c[0..3]: element i at row g + 8 (i / 2), column 2 t + (i % 2)
// mma.m16n8k8 with .tf32 inputs ("Matrix Fragments for mma.m16n8k8"), one 32-bit element per reg:
//   A 16x8 (row-major), a[0..3]: a[i] at row g + 8 (i % 2), column t + 4 (i / 2)
//   B 8x8 (column-major), b0, b1: b_i at row t + 4 i, column g
//   C/D 16x8 fp32: as for m16n8k16
// ldmatrix .x4: lane l gives the shared address of row l % 8 of matrix l / 8 (16 bytes, 16-byte
// aligned); r[j] receives matrix j in the A/B fragment order above (.trans: transposed).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#if defined(IMGTX_SIMT)
#include "simt/ptx.h"
#endif

namespace imgtx {
namespace ptx {

#if defined(IMGTX_SIMT)
// The emulator reports the kernel's call site of each instruction (default arguments are
// evaluated at the call; helpers that wrap these take and forward the same arguments).
#define IMGTX_PTX_SITE_ARGS_FIRST const char *site_file = __builtin_FILE(), int site_line = __builtin_LINE()
#define IMGTX_PTX_SITE_ARGS , IMGTX_PTX_SITE_ARGS_FIRST
#define IMGTX_PTX_SITE_VALUE ::simt::Site{site_file, site_line}
#define IMGTX_PTX_SITE_FORWARD , site_file, site_line
#define IMGTX_PTX_SITE_FORWARD_FIRST site_file, site_line
#else
#define IMGTX_PTX_SITE_ARGS_FIRST
#define IMGTX_PTX_SITE_ARGS
#define IMGTX_PTX_SITE_FORWARD
#define IMGTX_PTX_SITE_FORWARD_FIRST
#endif

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: c += a b (fp16 inputs, fp32 accumulate).
__device__ __forceinline__ void mma_m16n8k16_f16(float* c, const uint32_t* a, uint32_t b0,
                                                 uint32_t b1 IMGTX_PTX_SITE_ARGS) {
#if defined(IMGTX_SIMT)
  ::simt::ptx::mma_m16n8k16(c, a, b0, b1, ::simt::ptx::MmaType::kF16, IMGTX_PTX_SITE_VALUE);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: c += a b (bf16 inputs, fp32 accumulate).
__device__ __forceinline__ void mma_m16n8k16_bf16(float* c, const uint32_t* a, uint32_t b0,
                                                  uint32_t b1 IMGTX_PTX_SITE_ARGS) {
#if defined(IMGTX_SIMT)
  ::simt::ptx::mma_m16n8k16(c, a, b0, b1, ::simt::ptx::MmaType::kBF16, IMGTX_PTX_SITE_VALUE);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: c += a b (tf32 inputs in b32 registers,
// fp32 accumulate). The instruction does not round its inputs (the low 13 mantissa bits are not
// used; the emulator drops them): pass values already rounded to tf32.
__device__ __forceinline__ void mma_m16n8k8_tf32(float* c, const uint32_t* a, uint32_t b0,
                                                 uint32_t b1 IMGTX_PTX_SITE_ARGS) {
#if defined(IMGTX_SIMT)
  ::simt::ptx::mma_m16n8k8_tf32(c, a, b0, b1, IMGTX_PTX_SITE_VALUE);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (trans = false) or .x4.trans (trans = true).
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* row, bool trans IMGTX_PTX_SITE_ARGS) {
#if defined(IMGTX_SIMT)
  ::simt::ptx::ldmatrix_x4(r, row, trans, IMGTX_PTX_SITE_VALUE);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if (trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: copies src_bytes (0..16) bytes and
// zero-fills the rest of the 16; both addresses 16-byte aligned, src valid even when 0 bytes.
__device__ __forceinline__ void cp_async_cg16(void* dst, const void* src, int src_bytes IMGTX_PTX_SITE_ARGS) {
#if defined(IMGTX_SIMT)
  ::simt::ptx::cp_async_cg16(dst, src, src_bytes, IMGTX_PTX_SITE_VALUE);
#else
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(src_bytes));
#endif
}

// cp.async.commit_group: closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit(IMGTX_PTX_SITE_ARGS_FIRST) {
#if defined(IMGTX_SIMT)
  ::simt::ptx::cp_async_commit(IMGTX_PTX_SITE_VALUE);
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// cp.async.wait_group N: waits until at most N of this thread's committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait(IMGTX_PTX_SITE_ARGS_FIRST) {
#if defined(IMGTX_SIMT)
  ::simt::ptx::cp_async_wait(N, IMGTX_PTX_SITE_VALUE);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

}  // namespace ptx
}  // namespace imgtx
