// The CUDA execution-model emulator ("simt"): the internal API that the stand-in CUDA headers
// (csrc/simt/include) and the PTX twins (ptx.h) are written against.
//
// Model. A launch runs its blocks one after another, in an order shuffled by the seed. Each
// thread of a block is a fiber (a user-space context on its own stack) driven by one scheduler
// on the calling OS thread: a fiber runs until it blocks at a barrier or a warp collective, or
// exits, and the scheduler then picks the next runnable fiber at random (seeded). So between two
// synchronisation points the threads run in a shuffled order, and code that relies on an order
// it never synchronised reads shared memory that is still poisoned (0xFF bytes: a NaN for every
// float type) or stale, under some seed.
//
// Checks (each failure raises simt::KernelError naming kernel, block, threads and source site):
// divergent barriers and warp collectives (lanes of one mask at different call sites), lanes
// exiting while their warp waits on them, deadlocks, misaligned or non-shared cp.async/ldmatrix
// addresses, out-of-bounds shared-memory accesses (guard zones between allocations), shared-
// memory races (a write and an access by another thread with no barrier or warp
// synchronisation between them; access_hooks.cpp), and the launch limits of the emulated
// architecture (reported through cudaGetLastError like a real bad launch).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "vector_types.h"

namespace simt {

// A kernel failed under emulation. Thrown out of the launch (the emulator runs synchronously).
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The running thread's coordinates (the stand-ins for threadIdx & co. read these).
struct ThreadCoords {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
ThreadCoords& coords();

// A source site (file:line), taken with __builtin_FILE/__builtin_LINE at the call.
struct Site {
  const char* file;
  int line;
};
#define SIMT_SITE_ARGS const char *simt_file = __builtin_FILE(), int simt_line = __builtin_LINE()
#define SIMT_SITE ::simt::Site{simt_file, simt_line}

// ---- block-wide barriers ------------------------------------------------------------------
enum class BarrierOp { kPlain, kAnd, kOr, kCount };
int barrier(BarrierOp op, int pred, Site site);

// ---- warp collectives ---------------------------------------------------------------------
// Every lane of `mask` deposits its inputs (in[]), the last to arrive runs `fn` over all lanes'
// records, and each lane then reads its outputs (out[]). All lanes of the mask must arrive at the
// same site with the same kind and mask.
struct LaneIO {
  uint64_t in[12];
  uint64_t out[4];
  const void* ptr;
};
typedef void (*CollectiveFn)(LaneIO* const* lanes /* [32], null where not in mask */, unsigned mask,
                             const char* kind);
LaneIO& lane_io();
void warp_collective(const char* kind, unsigned mask, CollectiveFn fn, Site site);

// ---- shared memory -------------------------------------------------------------------------
// A static __shared__ declaration: allocated once per block at its exact size, poisoned.
struct SharedSite {
  size_t bytes;
  size_t align;
  const char* name;
  const char* file;
  int line;
};
void* static_shared(const SharedSite& site);
void* dynamic_shared();
// Whether [p, p + n) lies inside one shared allocation of the running block.
bool in_shared(const void* p, size_t n);
// An access to shared memory made by the emulator on behalf of thread `tid` (linear index in
// the block): ldmatrix rows, cp.async landings. Checked by the race detector.
void shared_access(const void* p, size_t n, bool write, int tid, const char* what);

// ---- errors and the launch -----------------------------------------------------------------
[[noreturn]] void fail(const std::string& what);  // from inside a kernel: aborts the launch

// Host side: the launch macro builds a Launch and hands the kernel body to run().
struct LaunchConfig {
  const char* kernel;
  const char* file;
  int line;
  dim3 grid, block;
  size_t dynamic_smem;
  const void* func;  // the kernel's address (cudaFuncSetAttribute's key)
  const void* params;  // the converted kernel parameters (constant memory on a GPU)
  size_t params_bytes;
};
typedef void (*BodyFn)(void* closure);
int run(const LaunchConfig& cfg, BodyFn body, void* closure);  // returns a cudaError_t

// Emulated device properties and run settings (Python: imgtx_fast.testing.emulated_cuda).
struct Settings {
  uint64_t seed = 0;
  int arch = 80;  // 80, 86, 89 or 90
  // Cost-model runs: execute only this many blocks of each launch (0 = all), chosen at random
  // (seeded); the launch log scales their counts to the whole grid. Outputs are then incomplete.
  uint64_t sample_blocks = 0;
  uint64_t launches_since_seed = 0;  // launch k after reseed(s) runs in the order of (s, k)
};
Settings& settings();
// Sets the seed and restarts its sequence: the same seed and the same launches give the same
// orders whatever ran before, while successive launches under one seed still differ.
void reseed(uint64_t seed);
int smem_optin_limit(int arch);  // cudaDevAttrMaxSharedMemoryPerBlockOptin of the arch
void set_func_attribute(const void* func, int attr, int value, int* err);

// Per-launch counters, for tests (which kernels ran) and the cost model.
struct Counters {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, collectives = 0, mma = 0;
  uint64_t shared_bytes_loaded = 0, shared_bytes_stored = 0;
  uint64_t global_bytes_loaded = 0, global_bytes_stored = 0;
};
Counters& counters();

// One record per launch (for the GPU cost model, benchmarks/gpu_model.py): the configuration
// and the counters of the blocks that ran, scaled to the whole grid when blocks were sampled.
struct LaunchRecord {
  std::string kernel, site;
  dim3 grid, block;
  size_t dynamic_smem = 0, static_smem = 0;
  uint64_t blocks_total = 0, blocks_run = 0;
  Counters counts;  // per launch, scaled by blocks_total / blocks_run
};
std::vector<LaunchRecord>& launch_log();

}  // namespace simt
