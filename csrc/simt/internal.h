// The emulator's internal state (shared by runtime.cpp, race.cpp and ptx.cpp; not a public API).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "simt/simt.h"

namespace simt {

// One 16-byte cp.async copy, captured at issue and written at the wait that covers it.
struct AsyncCopy {
  void* dst;
  unsigned char bytes[16];
};

struct Thread {
  enum State { kReady, kBarrier, kCollective, kExited };
  int tid = 0;  // linear index in the block
  uint3 idx{0, 0, 0};
  void* sp = nullptr;  // saved stack pointer while switched out
  char* stack = nullptr;
  size_t stack_size = 0;
  State state = kReady;
  Site where{nullptr, 0};  // where it waits
  int bar_result = 0;
  LaneIO io{};
  std::vector<AsyncCopy> uncommitted;
  std::vector<std::vector<AsyncCopy>> groups;  // committed, oldest first
};

struct PendingCollective {
  const char* kind;
  Site site;
  unsigned mask;
  unsigned arrived;
  CollectiveFn fn;
};

struct Warp {
  std::vector<PendingCollective> pending;
  uint32_t epoch = 0;   // completed full-warp synchronisations (race detector)
  unsigned lanes = 0;   // lanes that exist (a partial last warp has fewer)
  unsigned exited = 0;
};

struct SharedAlloc {
  size_t off, size;
  const char* name;
  const void* key;  // the SharedSite (static) or nullptr (dynamic)
  Site site;
};

struct Block {
  uint3 idx{0, 0, 0};
  int nthreads = 0, live = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  // the pending barrier
  int bar_arrived = 0, bar_acc = 0;
  BarrierOp bar_op = BarrierOp::kPlain;
  Site bar_site{nullptr, 0};
  uint32_t epoch = 1;  // completed barriers + 1
  uint32_t gen = 0;    // distinguishes blocks in the race detector's shadow
};

// Per OS thread: the launch in progress.
struct Emu {
  const LaunchConfig* cfg = nullptr;
  Block block;
  Thread* cur = nullptr;
  void* sched_sp = nullptr;
  std::mt19937_64 rng;
  std::string error;  // set by a failing fiber
  // shared memory arena (reused by every launch on this OS thread)
  unsigned char* arena = nullptr;
  size_t arena_cap = 0, arena_used = 0, static_bytes = 0, dynamic_bytes = 0;
  std::vector<SharedAlloc> allocs;
  // fiber stacks: one region, kMaxThreads slots
  char* stacks = nullptr;
  size_t stack_slot = 0;
  BodyFn body = nullptr;
  void* closure = nullptr;
  uint32_t next_gen = 0;
};
Emu& emu();

constexpr size_t kArenaBytes = 512 * 1024;
constexpr size_t kGap = 64;  // canary bytes between shared allocations
constexpr unsigned char kPoison = 0xFF;
constexpr unsigned char kCanary = 0xA5;
constexpr int kMaxThreads = 1024;

// Fibers (fiber.cpp).
void fiber_init(Thread& t, void (*entry)(void*), void* arg);
void fiber_switch(void** save_sp, void* to_sp, const char* to_stack, size_t to_size,
                  bool dying = false);
void fiber_enter_scheduler_info();

// Race detector / access accounting (race.cpp).
void race_begin_launch(Emu& e);
void race_end_launch();
void race_check(Emu& e, uintptr_t addr, size_t n, bool write, int tid, const char* what);
void count_atomic(const void* p, size_t n);

// Describes the current thread ("kernel K, block B, thread T") for messages.
std::string where_now();
const SharedAlloc* find_alloc(const Emu& e, uintptr_t addr, size_t n, bool* in_gap);

}  // namespace simt
