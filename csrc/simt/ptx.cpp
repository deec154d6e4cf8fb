// The emulated PTX instructions (declared in ptx.h). Fragment layouts, from the PTX ISA (9.7.14,
// "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8" and "Warp-level matrix load: ldmatrix"),
// with g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group):
//   m16n8k16 A (f16/bf16, 4 regs = 8 elements a0..a7, two per reg, low half first):
//     row = g + 8 * ((i / 2) % 2), col = 2 t + (i % 2) + 8 * (i / 4)
//   m16n8k16 B (2 regs = b0..b3): row (k) = 2 t + (i % 2) + 8 * (i / 2), col (n) = g
//   C/D (fp32, c0..c3): row = g + 8 * (i / 2), col = 2 t + (i % 2)
//   m16n8k8 tf32 A (a0..a3, one per reg): row = g + 8 * (i % 2), col = t + 4 * (i / 2)
//   m16n8k8 tf32 B (b0, b1): row (k) = t + 4 i, col (n) = g
//   ldmatrix .x4: lane l addresses row l % 8 of matrix l / 8; r[j] of lane l holds row l / 4,
//     columns 2 (l % 4) and 2 (l % 4) + 1 of matrix j; with .trans, column l / 4, rows
//     2 (l % 4) and 2 (l % 4) + 1.
// Accumulation: every product of the inputs is exact in double, so D = C + sum A B is formed in
// double and rounded to fp32 once. Tensor cores may round differently in the last bits; tests
// compare against references with fp16/bf16 tolerances, never bit-exactly.
#include <cstring>

#include "simt/float16.h"
#include "simt/internal.h"
#include "simt/ptx.h"

namespace simt {
namespace ptx {

namespace {

double half_value(uint32_t reg, int hi, MmaType type) {
  const unsigned short b = (unsigned short)(hi ? reg >> 16 : reg & 0xffffu);
  return type == MmaType::kBF16 ? double(bf16_bits_to_f32(b)) : double(f16_bits_to_f32(b));
}

// D = C + A B (K = 16 or 8) into each lane's c0..c3 (the C/D fragment), rounded once.
template <int K>
void write_d(LaneIO* const* lanes, const double (*A)[K], const double (*B)[8], const double (*C)[8]) {
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i / 2), n = 2 * t + (i % 2);
      double acc = C[m][n];
      for (int k = 0; k < K; ++k) acc += A[m][k] * B[k][n];
      lanes[l]->out[i] = f32_bits(float(acc));
    }
  }
  ++counters().mma;
}

void mma_k16(LaneIO* const* lanes, unsigned, const char* kind) {
  const MmaType type = std::strstr(kind, "bf16") ? MmaType::kBF16 : MmaType::kF16;
  double A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const LaneIO& io = *lanes[l];
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 8; ++i)
      A[g + 8 * ((i / 2) % 2)][2 * t + (i % 2) + 8 * (i / 4)] = half_value(uint32_t(io.in[i / 2]), i % 2, type);
    for (int i = 0; i < 4; ++i)
      B[2 * t + (i % 2) + 8 * (i / 2)][g] = half_value(uint32_t(io.in[4 + i / 2]), i % 2, type);
    for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * t + (i % 2)] = double(bits_f32(uint32_t(io.in[6 + i])));
  }
  write_d<16>(lanes, A, B, C);
}

void mma_k8_tf32(LaneIO* const* lanes, unsigned, const char*) {
  double A[16][8], B[8][8], C[16][8];
  auto tf32 = [](uint64_t r) { return double(bits_f32(uint32_t(r) & 0xffffe000u)); };
  for (int l = 0; l < 32; ++l) {
    const LaneIO& io = *lanes[l];
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) A[g + 8 * (i % 2)][t + 4 * (i / 2)] = tf32(io.in[i]);
    for (int i = 0; i < 2; ++i) B[t + 4 * i][g] = tf32(io.in[4 + i]);
    for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * t + (i % 2)] = double(bits_f32(uint32_t(io.in[6 + i])));
  }
  write_d<8>(lanes, A, B, C);
}

void ldmatrix(LaneIO* const* lanes, unsigned, const char* kind) {
  const bool trans = std::strstr(kind, "trans") != nullptr;
  Emu& e = emu();
  const int base = e.cur->tid - e.cur->tid % 32;
  unsigned short M[4][8][8];
  for (int l = 0; l < 32; ++l) {
    const void* row = lanes[l]->ptr;
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
      fail(std::string(kind) + ": lane " + std::to_string(l) + "'s row address is not 16-byte aligned");
    if (!in_shared(row, 16))
      fail(std::string(kind) + ": lane " + std::to_string(l) +
           "'s row address is not inside a shared-memory allocation");
    shared_access(row, 16, false, base + l, "ldmatrix");
    std::memcpy(M[l / 8][l % 8], row, 16);
  }
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j) {
      const int r = l / 4, c = 2 * (l % 4);
      const unsigned short lo = trans ? M[j][c][r] : M[j][r][c];
      const unsigned short hi = trans ? M[j][c + 1][r] : M[j][r][c + 1];
      lanes[l]->out[j] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
}

void load_mma_inputs(const float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  LaneIO& io = lane_io();
  for (int i = 0; i < 4; ++i) io.in[i] = a[i];
  io.in[4] = b0;
  io.in[5] = b1;
  for (int i = 0; i < 4; ++i) io.in[6 + i] = f32_bits(c[i]);
}

}  // namespace

void mma_m16n8k16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, MmaType type, Site site) {
  load_mma_inputs(c, a, b0, b1);
  warp_collective(type == MmaType::kBF16 ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16",
                  0xffffffffu, mma_k16, site);
  const LaneIO& io = lane_io();
  for (int i = 0; i < 4; ++i) c[i] = bits_f32(uint32_t(io.out[i]));
}

void mma_m16n8k8_tf32(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, Site site) {
  load_mma_inputs(c, a, b0, b1);
  warp_collective("mma.sync.m16n8k8.tf32", 0xffffffffu, mma_k8_tf32, site);
  const LaneIO& io = lane_io();
  for (int i = 0; i < 4; ++i) c[i] = bits_f32(uint32_t(io.out[i]));
}

void ldmatrix_x4(uint32_t* r, const void* row, bool trans, Site site) {
  lane_io().ptr = row;
  warp_collective(trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", 0xffffffffu, ldmatrix, site);
  const LaneIO& io = lane_io();
  for (int j = 0; j < 4; ++j) r[j] = uint32_t(io.out[j]);
}

void cp_async_cg16(void* dst, const void* src, int src_bytes, Site site) {
  (void)site;
  Emu& e = emu();
  Thread& t = *e.cur;
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0)
    fail("cp.async.cg 16: shared destination is not 16-byte aligned");
  if (!in_shared(dst, 16)) fail("cp.async.cg 16: destination is not inside a shared-memory allocation");
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async.cg 16: src-size must be in [0, 16]");
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fail("cp.async.cg 16: global source is not 16-byte aligned");
  AsyncCopy c;
  c.dst = dst;
  std::memset(c.bytes, 0, 16);
  if (src_bytes) std::memcpy(c.bytes, src, size_t(src_bytes));
  counters().global_bytes_loaded += uint64_t(src_bytes);
  // In flight: the destination reads as poison until the wait that lands it.
  race_check(e, reinterpret_cast<uintptr_t>(dst), 16, true, t.tid, "cp.async issue");
  std::memset(dst, kPoison, 16);
  t.uncommitted.push_back(c);
}

void cp_async_commit(Site) {
  Thread& t = *emu().cur;
  t.groups.push_back(std::move(t.uncommitted));
  t.uncommitted.clear();
}

void cp_async_wait(int pending_groups, Site) {
  Thread& t = *emu().cur;
  while (t.groups.size() > size_t(pending_groups)) {
    for (const AsyncCopy& c : t.groups.front()) {
      shared_access(c.dst, 16, true, t.tid, "cp.async landing");
      std::memcpy(c.dst, c.bytes, 16);
    }
    t.groups.erase(t.groups.begin());
  }
}

}  // namespace ptx
}  // namespace simt
