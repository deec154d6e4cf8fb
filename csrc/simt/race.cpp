// Shared-memory race detector and memory-traffic counters.
//
// The kernel sources of the emulated build are compiled with
//   -fsanitize=kernel-address --param asan-instrumentation-with-call-threshold=0
//   --param asan-stack=0 --param asan-globals=0
// which makes GCC call __asan_{load,store}{1,2,4,8,16,N}_noabort(addr[, size]) before every
// memory access of that code, and nothing else (no ASan runtime is involved). This file defines
// those hooks: an access inside the block's shared-memory arena is bounds-checked against the
// allocations and checked for races; any other access made while a kernel runs, outside the
// fiber stacks, is global memory and is counted. (The ASan build of scripts/sanitize.sh uses the
// real AddressSanitizer instead, and has neither hooks nor race detection.)
//
// Race rule: two accesses to a shared byte by different threads, at least one a write, race
// unless a __syncthreads completed between them, or both threads are in one warp and a
// full-warp collective (shuffle, vote, __syncwarp, mma, ldmatrix) completed between them. Per
// byte the shadow keeps the last writer and the last reader (or "several readers") with the
// block and warp epochs of their accesses.
#include <cstring>
#include <vector>

#include "simt/internal.h"

namespace simt {

namespace {

struct Shadow {
  uint32_t gen;                  // block generation: stale entries are empty
  uint32_t w_epoch, r_epoch;     // block epochs of the last write / read
  uint16_t w_tid, r_tid;         // thread + 1; 0 = none; kMany = several readers
  uint16_t w_wepoch, r_wepoch;   // warp epochs (mod 2^16) of those accesses
};
constexpr uint16_t kMany = 0xFFFF;

thread_local std::vector<Shadow> t_shadow;
thread_local uintptr_t t_lo = 0, t_hi = 0;            // the arena while a kernel runs
thread_local uintptr_t t_stack_lo = 0, t_stack_hi = 0;  // the fiber stacks (local memory)
thread_local bool t_active = false;
thread_local uintptr_t t_params_lo = 0, t_params_bytes = 0;

bool ordered(const Block& B, int prev_tid, uint32_t prev_epoch, uint16_t prev_wepoch, int tid) {
  if (prev_tid == tid) return true;
  if (prev_epoch != B.epoch) return true;
  if (prev_tid / 32 == tid / 32 && prev_wepoch != uint16_t(B.warps[size_t(tid / 32)].epoch)) return true;
  return false;
}

std::string describe(const Emu& e, uintptr_t addr) {
  bool gap;
  const SharedAlloc* a = find_alloc(e, addr, 1, &gap);
  if (!a) return "shared memory";
  return "`" + std::string(a->name) + "` + " +
         std::to_string(int64_t(addr) - int64_t(reinterpret_cast<uintptr_t>(e.arena) + a->off));
}

std::string tid_text(const Block& B, int tid) {
  const uint3 i = B.threads[size_t(tid)].idx;
  return "thread (" + std::to_string(i.x) + "," + std::to_string(i.y) + "," + std::to_string(i.z) + ")";
}

}  // namespace

void race_begin_launch(Emu& e) {
  t_lo = reinterpret_cast<uintptr_t>(e.arena);
  t_hi = t_lo + e.arena_cap;
  t_stack_lo = reinterpret_cast<uintptr_t>(e.stacks);
  t_stack_hi = t_stack_lo + e.stack_slot * kMaxThreads;
  t_params_lo = reinterpret_cast<uintptr_t>(e.cfg->params);
  t_params_bytes = e.cfg->params_bytes;
  if (t_shadow.size() < e.arena_cap) t_shadow.assign(e.arena_cap, Shadow{});
  t_active = true;
}

void race_end_launch() {
  t_active = false;
  t_lo = t_hi = 0;
}

void race_check(Emu& e, uintptr_t addr, size_t n, bool write, int tid, const char* what) {
  if (!t_active || t_shadow.empty()) return;
  const Block& B = e.block;
  const uintptr_t base = reinterpret_cast<uintptr_t>(e.arena);
  const uint16_t wepoch = uint16_t(B.warps[size_t(tid / 32)].epoch);
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = t_shadow[addr + i - base];
    if (s.gen != B.gen) s = Shadow{B.gen, 0, 0, 0, 0, 0, 0};
    if (s.w_tid && !ordered(B, s.w_tid - 1, s.w_epoch, s.w_wepoch, tid))
      fail(std::string("shared-memory race: ") + (write ? "write" : "read") + " (" + what + ") of " +
           describe(e, addr + i) + " by " + tid_text(B, tid) + " after a write by " +
           tid_text(B, s.w_tid - 1) + " with no barrier between them");
    if (write) {
      if (s.r_tid == kMany && s.r_epoch == B.epoch)
        fail(std::string("shared-memory race: write (") + what + ") of " + describe(e, addr + i) +
             " by " + tid_text(B, tid) + " after reads by several threads with no barrier between them");
      if (s.r_tid && s.r_tid != kMany && !ordered(B, s.r_tid - 1, s.r_epoch, s.r_wepoch, tid))
        fail(std::string("shared-memory race: write (") + what + ") of " + describe(e, addr + i) +
             " by " + tid_text(B, tid) + " after a read by " + tid_text(B, s.r_tid - 1) +
             " with no barrier between them");
      s.w_tid = uint16_t(tid + 1);
      s.w_epoch = B.epoch;
      s.w_wepoch = wepoch;
      s.r_tid = 0;
    } else {
      if (s.r_tid == 0 || s.r_tid == tid + 1 ||
          (s.r_tid != kMany && ordered(B, s.r_tid - 1, s.r_epoch, s.r_wepoch, tid)) ||
          (s.r_tid == kMany && s.r_epoch != B.epoch)) {
        s.r_tid = uint16_t(tid + 1);
      } else {
        s.r_tid = kMany;
      }
      s.r_epoch = B.epoch;
      s.r_wepoch = wepoch;
    }
  }
}

// The hook behind every instrumented access.
static inline void on_access(uintptr_t addr, size_t n, bool write) {
  if (!t_active) return;
  if (addr >= t_lo && addr < t_hi) {
    Emu& e = emu();
    if (!e.cur) return;
    bool gap;
    const SharedAlloc* a = find_alloc(e, addr, n, &gap);
    if (!a || gap)
      fail(std::string("out-of-bounds shared-memory ") + (write ? "write" : "read") + " of " +
           std::to_string(n) + " bytes at " +
           (a ? "`" + std::string(a->name) + "` + " +
                    std::to_string(int64_t(addr) - int64_t(reinterpret_cast<uintptr_t>(e.arena) + a->off)) +
                    " (" + std::to_string(a->size) + " bytes)"
              : std::string("an unallocated address")));
    race_check(e, addr, n, write, e.cur->tid, "plain access");
    if (write) counters().shared_bytes_stored += n;
    else counters().shared_bytes_loaded += n;
    return;
  }
  if (addr >= t_stack_lo && addr < t_stack_hi) return;  // local memory (registers, arrays)
  if (addr - t_params_lo < t_params_bytes) return;       // kernel parameters
  if (addr - reinterpret_cast<uintptr_t>(&coords()) < sizeof(ThreadCoords)) return;  // threadIdx & co
  if (write) counters().global_bytes_stored += n;
  else counters().global_bytes_loaded += n;
}

// Atomics run in the (uninstrumented) runtime: each is a read and a write of n bytes, counted as
// global or shared traffic like the kernels' own accesses.
void count_atomic(const void* p, size_t n) {
  if (!t_active) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  Counters& c = counters();
  if (a >= t_lo && a < t_hi) {
    c.shared_bytes_loaded += n;
    c.shared_bytes_stored += n;
  } else {
    c.global_bytes_loaded += n;
    c.global_bytes_stored += n;
  }
}

}  // namespace simt

#if defined(SIMT_ACCESS_HOOKS)
extern "C" {
#define SIMT_HOOK(n)                                                                          \
  void __asan_load##n##_noabort(uintptr_t a) { ::simt::on_access(a, n, false); }            \
  void __asan_store##n##_noabort(uintptr_t a) { ::simt::on_access(a, n, true); }
SIMT_HOOK(1)
SIMT_HOOK(2)
SIMT_HOOK(4)
SIMT_HOOK(8)
SIMT_HOOK(16)
#undef SIMT_HOOK
void __asan_loadN_noabort(uintptr_t a, size_t n) { ::simt::on_access(a, n, false); }
void __asan_storeN_noabort(uintptr_t a, size_t n) { ::simt::on_access(a, n, true); }
void __asan_handle_no_return() {}
}
#endif
