// The emulator's scheduler: launches, blocks, barriers, warp collectives, shared memory and the
// checks around them (the model is described in simt.h).
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <numeric>

#include "simt/internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define SIMT_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define SIMT_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define SIMT_POISON(p, n) ((void)(p), (void)(n))
#define SIMT_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace simt {

namespace {

#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kStackBytes = 512 * 1024;  // ASan's redzones make frames larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif
constexpr size_t kPage = 4096;

thread_local ThreadCoords t_coords;

std::string hex(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

std::string lanes_text(unsigned m) {
  std::string s = "{";
  bool first = true;
  for (int i = 0; i < 32; ++i) {
    if (!(m >> i & 1u)) continue;
    int j = i;
    while (j + 1 < 32 && (m >> (j + 1) & 1u)) ++j;
    s += (first ? "" : ",") + std::to_string(i) + (j > i ? "-" + std::to_string(j) : "");
    first = false;
    i = j;
  }
  return s + "}";
}

std::string site_text(Site s) {
  if (!s.file) return "?";
  const char* base = std::strrchr(s.file, '/');
  return std::string(base ? base + 1 : s.file) + ":" + std::to_string(s.line);
}

bool same_site(Site a, Site b) {
  return a.line == b.line && (a.file == b.file || (a.file && b.file && !std::strcmp(a.file, b.file)));
}

std::string dim_text(uint3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

int g_last_error = 0;  // the sticky cudaGetLastError value (per process, like one device)

void ensure_memory(Emu& e) {
  if (e.arena) return;
  void* a = mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  void* s = mmap(nullptr, kStackBytes * kMaxThreads, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (a == MAP_FAILED || s == MAP_FAILED) throw std::runtime_error("simt: cannot map emulator memory");
  e.arena = static_cast<unsigned char*>(a);
  e.arena_cap = kArenaBytes;
  e.stacks = static_cast<char*>(s);
  e.stack_slot = kStackBytes;
  for (int i = 0; i < kMaxThreads; ++i)  // a guard page under each stack: overflow faults
    mprotect(e.stacks + size_t(i) * kStackBytes, kPage, PROT_NONE);
}

void poison_arena(Emu& e) {
  SIMT_UNPOISON(e.arena, e.arena_cap);
  std::memset(e.arena, kCanary, e.arena_used);
  for (const SharedAlloc& a : e.allocs) std::memset(e.arena + a.off, kPoison, a.size);
  for (const SharedAlloc& a : e.allocs) {
    SIMT_POISON(e.arena + a.off - kGap, kGap);
    SIMT_POISON(e.arena + a.off + a.size, kGap);
  }
  SIMT_POISON(e.arena + e.arena_used, e.arena_cap - e.arena_used);
}

void check_canaries(Emu& e) {
  for (const SharedAlloc& a : e.allocs) {
    for (size_t side = 0; side < 2; ++side) {
      unsigned char* g = side ? e.arena + a.off + a.size : e.arena + a.off - kGap;
      SIMT_UNPOISON(g, kGap);
      size_t bad = kGap;
      for (size_t i = 0; i < kGap; ++i)
        if (g[i] != kCanary) {
          bad = i;
          break;
        }
      SIMT_POISON(g, kGap);
      if (bad != kGap)
        fail("shared memory written out of bounds: byte " +
             (side ? "+" + std::to_string(a.size + bad) + " past the start of `"
                   : std::to_string(int(bad) - int(kGap)) + " before `") +
             a.name + "` (" + std::to_string(a.size) + " bytes, " + site_text(a.site) + ")");
    }
  }
}

SharedAlloc& add_alloc(Emu& e, size_t size, size_t align, const char* name, const void* key, Site site) {
  align = std::max<size_t>(align, 16);
  size_t off = (e.arena_used + align - 1) / align * align;
  if (off < e.arena_used + kGap) off = (e.arena_used + kGap + align - 1) / align * align;
  if (off + size + kGap > e.arena_cap) fail("shared memory exhausted (emulator arena)");
  SIMT_UNPOISON(e.arena + e.arena_used, off + size + kGap - e.arena_used);
  std::memset(e.arena + e.arena_used, kCanary, off - e.arena_used);
  std::memset(e.arena + off, kPoison, size);
  std::memset(e.arena + off + size, kCanary, kGap);
  SIMT_POISON(e.arena + e.arena_used, off - e.arena_used);
  SIMT_POISON(e.arena + off + size, kGap);
  e.arena_used = off + size + kGap;
  e.allocs.push_back(SharedAlloc{off, size, name, key, site});
  return e.allocs.back();
}

void yield(Emu& e, Thread& t) { fiber_switch(&t.sp, e.sched_sp, nullptr, 0); }

void make_ready(Block& B, Thread& t);

void complete_barrier(Emu& e) {
  Block& B = e.block;
  int result = 0;
  switch (B.bar_op) {
    case BarrierOp::kAnd: result = B.bar_acc == B.bar_arrived; break;
    case BarrierOp::kOr: result = B.bar_acc > 0; break;
    case BarrierOp::kCount: result = B.bar_acc; break;
    default: break;
  }
  for (Thread& t : B.threads)
    if (t.state == Thread::kBarrier) {
      t.bar_result = result;
      make_ready(B, t);
    }
  B.bar_arrived = 0;
  B.bar_acc = 0;
  ++B.epoch;
  ++counters().barriers;
  check_canaries(e);
}

thread_local std::vector<int> t_ready;

void make_ready(Block&, Thread& t) {
  t.state = Thread::kReady;
  t_ready.push_back(t.tid);
}

void thread_exit(Emu& e, Thread& t) {
  Block& B = e.block;
  t.state = Thread::kExited;
  --B.live;
  Warp& w = B.warps[t.tid / 32];
  const unsigned bit = 1u << (t.tid % 32);
  w.exited |= bit;
  for (const PendingCollective& p : w.pending)
    if ((p.mask & bit) && !(p.arrived & bit) && e.error.empty())
      e.error = where_now() + ": exited while lanes " + lanes_text(p.arrived) + " of warp " +
                std::to_string(t.tid / 32) + " wait for it at " + p.kind + " (" + site_text(p.site) +
                ", mask " + hex(p.mask) + ")";
  size_t in_flight = t.uncommitted.size();
  for (const std::vector<AsyncCopy>& g : t.groups) in_flight += g.size();
  if (in_flight && e.error.empty())  // they could land after the block's shared memory is reused
    e.error = where_now() + ": exited with " + std::to_string(in_flight) +
              " cp.async copies in flight (never covered by a cp.async.wait_group)";
  if (B.bar_arrived > 0 && B.bar_arrived == B.live && e.error.empty()) {
    try {
      complete_barrier(e);
    } catch (const std::exception& ex) {
      e.error = ex.what();
    }
  }
}

void fiber_entry(void* arg) {
  fiber_enter_scheduler_info();
  Thread* t = static_cast<Thread*>(arg);
  Emu& e = emu();
  try {
    e.body(e.closure);
  } catch (const std::exception& ex) {
    if (e.error.empty()) e.error = ex.what();
  } catch (...) {
    if (e.error.empty()) e.error = where_now() + ": unknown exception";
  }
  thread_exit(e, *t);
  for (;;) fiber_switch(&t->sp, e.sched_sp, nullptr, 0, /*dying=*/true);  // never resumed
}

[[noreturn]] void deadlock(Emu& e) {
  Block& B = e.block;
  std::string msg = "deadlock: no thread can run.";
  if (B.bar_arrived > 0)
    msg += " " + std::to_string(B.bar_arrived) + " of " + std::to_string(B.live) +
           " live threads wait at __syncthreads (" + site_text(B.bar_site) + ").";
  for (size_t wi = 0; wi < B.warps.size(); ++wi)
    for (const PendingCollective& p : B.warps[wi].pending) {
      msg += " Warp " + std::to_string(wi) + ": lanes " + lanes_text(p.arrived) + " wait at " +
             p.kind + " (" + site_text(p.site) + ", mask " + hex(p.mask) + ") for lanes " +
             lanes_text(p.mask & ~p.arrived);
      for (int l = 0; l < 32; ++l) {
        if (!((p.mask & ~p.arrived) >> l & 1u)) continue;
        const Thread& o = B.threads[wi * 32 + l];
        msg += o.state == Thread::kExited ? " (lane " + std::to_string(l) + " exited)"
               : " (lane " + std::to_string(l) + " waits at " + site_text(o.where) + ")";
        break;
      }
      msg += ".";
    }
  fail(msg);
}

void run_block(Emu& e, uint3 bidx) {
  const LaunchConfig& c = *e.cfg;
  Block& B = e.block;
  B.idx = bidx;
  B.nthreads = int(c.block.x * c.block.y * c.block.z);
  B.live = B.nthreads;
  B.threads.resize(size_t(B.nthreads));
  B.warps.assign(size_t((B.nthreads + 31) / 32), Warp{});
  for (size_t w = 0; w < B.warps.size(); ++w) {
    const int n = std::min(32, B.nthreads - int(w) * 32);
    B.warps[w].lanes = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
  }
  B.bar_arrived = B.bar_acc = 0;
  B.epoch = 1;
  B.gen = ++e.next_gen;
  poison_arena(e);
  t_ready.clear();
  for (int i = 0; i < B.nthreads; ++i) {
    Thread& t = B.threads[size_t(i)];
    t.tid = i;
    t.idx = uint3{unsigned(i) % c.block.x, unsigned(i) / c.block.x % c.block.y,
                  unsigned(i) / (c.block.x * c.block.y)};
    t.state = Thread::kReady;
    t.where = Site{nullptr, 0};
    t.uncommitted.clear();
    t.groups.clear();
    t.stack = e.stacks + size_t(i) * e.stack_slot + kPage;
    t.stack_size = e.stack_slot - kPage;
    fiber_init(t, fiber_entry, &t);
    t_ready.push_back(i);
  }
  ++counters().blocks;
  counters().threads += uint64_t(B.nthreads);
  t_coords.block_idx = bidx;
  t_coords.block_dim = c.block;
  t_coords.grid_dim = c.grid;
  while (B.live > 0) {
    if (!e.error.empty()) break;
    if (t_ready.empty()) deadlock(e);
    const size_t pick = size_t(e.rng() % t_ready.size());
    const int id = t_ready[pick];
    t_ready[pick] = t_ready.back();
    t_ready.pop_back();
    Thread& t = B.threads[size_t(id)];
    e.cur = &t;
    t_coords.thread_idx = t.idx;
    fiber_switch(&e.sched_sp, t.sp, t.stack, t.stack_size);
    e.cur = nullptr;
  }
  if (!e.error.empty()) {
    std::string msg;
    msg.swap(e.error);
    throw KernelError(msg);
  }
  check_canaries(e);
}

}  // namespace

Emu& emu() {
  thread_local Emu e;
  return e;
}

ThreadCoords& coords() { return t_coords; }

Settings& settings() {
  static Settings s;
  return s;
}

Counters& counters() {
  static Counters c;
  return c;
}

void reseed(uint64_t seed) {
  settings().seed = seed;
  settings().launches_since_seed = 0;
}

std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}

int smem_optin_limit(int arch) {
  switch (arch) {
    case 86:
    case 89: return 99 * 1024;
    case 90: return 227 * 1024;
    default: return 163 * 1024;  // sm_80
  }
}

std::string where_now() {
  Emu& e = emu();
  if (!e.cfg) return "simt (no kernel running)";
  std::string s = "simt: kernel `" + std::string(e.cfg->kernel) + "` (launched at " +
                  site_text(Site{e.cfg->file, e.cfg->line}) + "), block " + dim_text(e.block.idx);
  if (e.cur)
    s += ", thread " + dim_text(e.cur->idx) + " [warp " + std::to_string(e.cur->tid / 32) +
         " lane " + std::to_string(e.cur->tid % 32) + "]";
  return s;
}

void fail(const std::string& what) { throw KernelError(where_now() + ": " + what); }

LaneIO& lane_io() { return emu().cur->io; }

int barrier(BarrierOp op, int pred, Site site) {
  Emu& e = emu();
  Block& B = e.block;
  Thread& t = *e.cur;
  if (B.bar_arrived > 0 && (!same_site(B.bar_site, site) || B.bar_op != op))
    fail("divergent barrier: this thread reached " + site_text(site) + " while " +
         std::to_string(B.bar_arrived) + " threads wait at " + site_text(B.bar_site));
  if (B.bar_arrived == 0) {
    B.bar_site = site;
    B.bar_op = op;
  }
  ++B.bar_arrived;
  B.bar_acc += pred;
  t.state = Thread::kBarrier;
  t.where = site;
  if (B.bar_arrived == B.live) complete_barrier(e);  // makes every waiter ready, this one too
  yield(e, t);
  return t.bar_result;
}

void warp_collective(const char* kind, unsigned mask, CollectiveFn fn, Site site) {
  Emu& e = emu();
  Block& B = e.block;
  Thread& t = *e.cur;
  const int lane = t.tid % 32;
  const unsigned bit = 1u << lane;
  Warp& w = B.warps[size_t(t.tid / 32)];
  ++counters().collectives;
  if (!(mask & bit))
    fail(std::string(kind) + " (" + site_text(site) + ") with mask " + hex(mask) +
         " that does not include the calling lane " + std::to_string(lane));
  if (mask & ~w.lanes)
    fail(std::string(kind) + " (" + site_text(site) + ") with mask " + hex(mask) +
         " naming lanes " + lanes_text(mask & ~w.lanes) + " that do not exist in this warp");
  if (mask & w.exited)
    fail(std::string(kind) + " (" + site_text(site) + ") with mask " + hex(mask) +
         " naming lanes " + lanes_text(mask & w.exited) + " that have exited");
  PendingCollective* p = nullptr;
  for (PendingCollective& q : w.pending)
    if (q.mask & bit) p = &q;
  if (p) {
    if (p->mask != mask || std::strcmp(p->kind, kind) != 0 || !same_site(p->site, site))
      fail("divergent warp collective: lane " + std::to_string(lane) + " reached " + kind + " (" +
           site_text(site) + ", mask " + hex(mask) + ") while lanes " + lanes_text(p->arrived) +
           " wait at " + p->kind + " (" + site_text(p->site) + ", mask " + hex(p->mask) + ")");
  } else {
    for (const PendingCollective& q : w.pending)
      if (q.mask & mask)
        fail(std::string(kind) + " (" + site_text(site) + ") with mask " + hex(mask) +
             " overlaps a pending " + q.kind + " (" + site_text(q.site) + ") with mask " + hex(q.mask));
    w.pending.push_back(PendingCollective{kind, site, mask, 0u, fn});
    p = &w.pending.back();
  }
  p->arrived |= bit;
  t.state = Thread::kCollective;
  t.where = site;
  if (p->arrived == mask) {
    LaneIO* lanes[32] = {};
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1u) lanes[l] = &B.threads[size_t(t.tid - lane + l)].io;
    const PendingCollective done = *p;
    w.pending.erase(w.pending.begin() + (p - w.pending.data()));
    if (done.fn) done.fn(lanes, mask, kind);
    if (mask == w.lanes) ++w.epoch;
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1u) make_ready(B, B.threads[size_t(t.tid - lane + l)]);
  }
  yield(e, t);
}

namespace {
void collective_shfl(LaneIO* const* lanes, unsigned mask, const char* kind) {
  for (int l = 0; l < 32; ++l) {
    if (!lanes[l]) continue;
    const LaneIO& io = *lanes[l];
    const int mode = int(io.in[1]), b = int(uint32_t(io.in[2])), width = int(uint32_t(io.in[3]));
    if (width < 1 || width > 32 || (width & (width - 1)))
      fail(std::string(kind) + ": width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
    // PTX shfl.sync: c = ((32 - width) << 8) | clamp; segmask = c[12:8]
    const int segmask = (32 - width) & 31;
    const int clamp = mode == 1 ? 0 : 31;
    const int min_lane = l & segmask, max_lane = min_lane | (clamp & ~segmask);
    int j = l;
    bool ok;
    switch (mode) {
      case 1: j = l - b; ok = j >= max_lane; break;
      case 2: j = l + b; ok = j <= max_lane; break;
      case 3: j = l ^ b; ok = j <= max_lane; break;
      default: j = min_lane | (b & ~segmask); ok = j <= max_lane; break;
    }
    if (!ok) j = l;
    if (j < 0 || j > 31 || !(mask >> j & 1u))
      fail(std::string(kind) + ": lane " + std::to_string(l) + " reads lane " + std::to_string(j) +
           ", which is not in the mask " + hex(mask) + " (undefined on the GPU)");
    lanes[l]->out[0] = lanes[j]->in[0];
  }
}

void collective_vote(LaneIO* const* lanes, unsigned mask, const char*) {
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (lanes[l] && lanes[l]->in[0]) ballot |= uint64_t(1) << l;
  for (int l = 0; l < 32; ++l)
    if (lanes[l]) lanes[l]->out[0] = ballot & mask;
}

}  // namespace

uint64_t shfl_bits(unsigned mask, uint64_t bits, int mode, int b, int width, const char* kind, Site site) {
  LaneIO& io = lane_io();
  io.in[0] = bits;
  io.in[1] = uint64_t(mode);
  io.in[2] = uint64_t(uint32_t(b));
  io.in[3] = uint64_t(uint32_t(width));
  warp_collective(kind, mask, collective_shfl, site);
  return io.out[0];
}

uint64_t vote(unsigned mask, int pred, const char* kind, Site site) {
  LaneIO& io = lane_io();
  io.in[0] = pred != 0;
  warp_collective(kind, mask, collective_vote, site);
  return io.out[0];
}

void* static_shared(const SharedSite& s) {
  Emu& e = emu();
  for (const SharedAlloc& a : e.allocs)
    if (a.key == &s) return e.arena + a.off;
  e.static_bytes += s.bytes;
  if (e.static_bytes > 48 * 1024)
    fail("static shared memory exceeds 48 KB: " + std::to_string(e.static_bytes) + " bytes with `" +
         s.name + "` (" + site_text(Site{s.file, s.line}) + ")");
  if (e.static_bytes + e.dynamic_bytes > size_t(smem_optin_limit(settings().arch)))
    fail("static + dynamic shared memory (" + std::to_string(e.static_bytes + e.dynamic_bytes) +
         " bytes) exceeds sm_" + std::to_string(settings().arch) + "'s limit per block");
  return e.arena + add_alloc(e, s.bytes, s.align, s.name, &s, Site{s.file, s.line}).off;
}

void* dynamic_shared() {
  Emu& e = emu();
  for (const SharedAlloc& a : e.allocs)
    if (!a.key) return e.arena + a.off;
  // A kernel that declares extern __shared__ but was launched with 0 bytes: a pointer to an
  // empty allocation (any access is out of bounds).
  return e.arena + add_alloc(e, 0, 16, "dynamic shared memory", nullptr,
                             Site{e.cfg->file, e.cfg->line}).off;
}

const SharedAlloc* find_alloc(const Emu& e, uintptr_t addr, size_t n, bool* in_gap) {
  *in_gap = false;
  const uintptr_t base = reinterpret_cast<uintptr_t>(e.arena);
  if (addr < base || addr >= base + e.arena_used) return nullptr;
  const SharedAlloc* near = nullptr;
  for (const SharedAlloc& a : e.allocs) {
    const uintptr_t lo = base + a.off, hi = lo + a.size;
    if (addr >= lo && addr + n <= hi) return &a;
    if (addr + n > lo - kGap && addr < hi + kGap) near = &a;
  }
  *in_gap = true;
  return near;
}

bool in_shared(const void* p, size_t n) {
  bool gap;
  return find_alloc(emu(), reinterpret_cast<uintptr_t>(p), n, &gap) != nullptr && !gap;
}

void shared_access(const void* p, size_t n, bool write, int tid, const char* what) {
  Emu& e = emu();
  race_check(e, reinterpret_cast<uintptr_t>(p), n, write, tid, what);
  if (write) counters().shared_bytes_stored += n;
  else counters().shared_bytes_loaded += n;
}

int run(const LaunchConfig& cfg, BodyFn body, void* closure) {
  Emu& e = emu();
  if (e.cfg) fail("kernel launch from inside a kernel (dynamic parallelism) is not emulated");
  const uint64_t nthreads = uint64_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  auto bad = [&](int err) {
    g_last_error = err;
    return err;
  };
  if (nthreads == 0 || nthreads > 1024 || cfg.block.x > 1024 || cfg.block.y > 1024 ||
      cfg.block.z > 64 || cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 ||
      cfg.grid.x > 0x7fffffffu || cfg.grid.y > 65535 || cfg.grid.z > 65535)
    return bad(9 /* cudaErrorInvalidConfiguration */);
  extern size_t func_smem_optin(const void* func);
  const size_t allowed = std::max<size_t>(48 * 1024, func_smem_optin(cfg.func));
  if (cfg.dynamic_smem > allowed || cfg.dynamic_smem > size_t(smem_optin_limit(settings().arch)))
    return bad(1 /* cudaErrorInvalidValue: too much dynamic shared memory */);
  ensure_memory(e);
  struct Reset {
    Emu& e;
    ~Reset() {
      e.cfg = nullptr;
      e.cur = nullptr;
      race_end_launch();
    }
  } reset{e};
  e.cfg = &cfg;
  e.body = body;
  e.closure = closure;
  e.error.clear();
  e.allocs.clear();
  e.arena_used = kGap;
  e.static_bytes = 0;
  e.dynamic_bytes = cfg.dynamic_smem;
  std::memset(e.arena, kCanary, kGap);
  if (cfg.dynamic_smem) add_alloc(e, cfg.dynamic_smem, 16, "dynamic shared memory", nullptr, Site{cfg.file, cfg.line});
  Counters& k = counters();
  const Counters before = k;
  ++k.launches;
  // The schedule depends on the seed and on the launches since reseed() (emulated_cuda(seed)
  // reseeds on entry): a failure seen under a seed reproduces when its test runs alone.
  e.rng.seed(settings().seed * 0x9E3779B97F4A7C15ull + settings().launches_since_seed++);
  race_begin_launch(e);
  const uint64_t nblocks = uint64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  std::vector<uint64_t> order(nblocks);
  std::iota(order.begin(), order.end(), uint64_t(0));
  std::shuffle(order.begin(), order.end(), e.rng);
  const uint64_t sample = settings().sample_blocks;
  if (sample && sample < nblocks) order.resize(sample);
  for (uint64_t id : order) {
    const uint3 b{unsigned(id % cfg.grid.x), unsigned(id / cfg.grid.x % cfg.grid.y),
                  unsigned(id / (uint64_t(cfg.grid.x) * cfg.grid.y))};
    run_block(e, b);
  }
  LaunchRecord r;
  r.kernel = cfg.kernel;
  r.site = site_text(Site{cfg.file, cfg.line});
  r.grid = cfg.grid;
  r.block = cfg.block;
  r.dynamic_smem = cfg.dynamic_smem;
  r.static_smem = e.static_bytes;
  r.blocks_total = nblocks;
  r.blocks_run = order.size();
  const double f = double(nblocks) / double(std::max<uint64_t>(order.size(), 1));
  auto scaled = [&](uint64_t now, uint64_t then) { return uint64_t(double(now - then) * f + 0.5); };
  r.counts.launches = 1;
  r.counts.blocks = nblocks;
  r.counts.threads = nblocks * nthreads;
  r.counts.barriers = scaled(k.barriers, before.barriers);
  r.counts.collectives = scaled(k.collectives, before.collectives);
  r.counts.mma = scaled(k.mma, before.mma);
  r.counts.shared_bytes_loaded = scaled(k.shared_bytes_loaded, before.shared_bytes_loaded);
  r.counts.shared_bytes_stored = scaled(k.shared_bytes_stored, before.shared_bytes_stored);
  r.counts.global_bytes_loaded = scaled(k.global_bytes_loaded, before.global_bytes_loaded);
  r.counts.global_bytes_stored = scaled(k.global_bytes_stored, before.global_bytes_stored);
  launch_log().push_back(std::move(r));
  return 0;
}

int take_last_error(bool clear) {
  const int err = g_last_error;
  if (clear) g_last_error = 0;
  return err;
}

}  // namespace simt
