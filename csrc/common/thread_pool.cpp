#include "common/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <dlfcn.h>
#include <exception>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <string>
#include <thread>
#include <vector>

namespace imgtx {
namespace {

thread_local bool t_inside_task = false;

// The tasks of one call, split into one contiguous range per worker. Each range is claimed
// from its front by its own counter; a worker that has run out of its own range goes on with
// the others' (so a helper that never joins, or a slow one, holds nothing up).
// Why contiguous ranges rather than one shared counter: torch's parallel ops split their rows
// the same way (a static schedule), so the rows a worker reads were most likely written by its
// own core just before (a Linear's output, in its L2). With one shared counter the workers
// took every other task and read half of their inputs from the other core's cache.
class TaskRanges {
 public:
  void reset(int64_t num_tasks, int workers) {
    if (workers > capacity_) {
      ranges_.reset(new Range[size_t(workers)]);
      capacity_ = workers;
    }
    count_ = workers;
    for (int w = 0; w < workers; ++w) {
      ranges_[w].next.store(num_tasks * w / workers);
      ranges_[w].end = num_tasks * (w + 1) / workers;
    }
  }

  // Runs tasks, own range first, until none is left. The first exception is kept in `error`
  // and stops the handing out; the caller rethrows it once every worker is done.
  void drain(const std::function<void(int64_t, int)>& fn, int worker, std::mutex& err_mu,
             std::exception_ptr& error) {
    for (int i = 0; i < count_; ++i) {
      Range& r = ranges_[(worker + i) % count_];
      for (;;) {
        const int64_t t = r.next.fetch_add(1);
        if (t >= r.end) break;
        try {
          fn(t, worker);
        } catch (...) {
          std::lock_guard<std::mutex> lk(err_mu);
          if (!error) error = std::current_exception();
          for (int j = 0; j < count_; ++j) ranges_[j].next.store(ranges_[j].end);
        }
      }
    }
  }

 private:
  struct alignas(64) Range {  // one cache line each: the counters are written concurrently
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::unique_ptr<Range[]> ranges_;
  int capacity_ = 0, count_ = 0;
};

// Waits until done() holds or `limit` has passed, without sleeping; returns done().
// Why spin at all: waking a thread that sleeps on a condition variable took longer in a VM than
// a short kernel call (a (1, 8, 1, 64) decode over 1024 keys: 178 us on 1 thread, 277 us on 2),
// so the pool's helpers and its caller spin briefly before they sleep, as OpenMP's threads do.
template <class Done>
bool spin_until(Done done, std::chrono::microseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (int i = 0;; ++i) {
    if (done()) return true;
    if ((i & 63) == 63 && std::chrono::steady_clock::now() >= deadline) return done();
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

// How long the pool's threads spin before sleeping: a few back-to-back calls' gaps (Python and
// NumPy work between kernel calls), short enough that idle helpers give their cores back soon.
constexpr std::chrono::microseconds kSpin{200};

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Returns false (without running anything) when another caller holds the pool.
  //
  // Helpers join a call only while it is open. The caller closes it once it has run out of
  // tasks and then waits only for the helpers that joined: a helper the OS has not scheduled
  // yet (its core busy, e.g. with torch's OpenMP threads spinning after a torch op) is not
  // waited for, so the call never stalls for a scheduler time slice (measured: 3 ms -> 8 ms
  // steps when every call waited for every helper).
  //
  // spin: whether the threads spin (kSpin) before sleeping, for this call's end and for the next
  // call. Only when no OpenMP runtime is in the process: next to torch's spinning OpenMP threads
  // (IMGTX_FAST_CPU_THREADING=pool, or a forked child) spinning helpers would take their cores.
  bool try_run(int64_t num_tasks, int workers, const std::function<void(int64_t, int)>& fn,
               bool spin) {
    std::unique_lock<std::mutex> busy(busy_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(workers - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      tasks_.reset(num_tasks, workers);
      active_helpers_ = workers - 1;
      open_ = true;
      joined_ = 0;
      finished_.store(0);
      error_ = nullptr;
      spin_.store(spin, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lk(mu_);
    open_ = false;
    if (spin && finished_.load() != joined_) {  // helpers still at work: wait for them awake
      const int joined = joined_;
      lk.unlock();
      spin_until([&] { return finished_.load(std::memory_order_acquire) >= joined; }, kSpin);
      lk.lock();
    }
    done_cv_.wait(lk, [&] { return finished_.load() == joined_; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
    return true;
  }

 private:
  void grow(int helpers) {
    while (int(threads_.size()) < helpers) {
      const int id = int(threads_.size()) + 1;
      threads_.emplace_back([this, id] { loop(id); });
    }
  }

  void loop(int id) {
    t_inside_task = true;  // nested parallel_for calls from a task run inline
    uint64_t seen = 0;
    for (;;) {
      if (spin_.load(std::memory_order_relaxed))  // the next call may come right away
        spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; }, kSpin);
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || (generation_.load() != seen && id <= active_helpers_); });
        if (stop_) return;
        seen = generation_.load();
        if (!open_) continue;  // woke after the caller finished: nothing left to join
        ++joined_;
      }
      work(id);
      std::lock_guard<std::mutex> lk(mu_);
      if (finished_.fetch_add(1) + 1 == joined_) done_cv_.notify_one();
    }
  }

  void work(int worker) { tasks_.drain(*fn_, worker, err_mu_, error_); }

  std::mutex busy_mu_;  // one parallel_for at a time owns the helpers
  std::mutex mu_, err_mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  TaskRanges tasks_;
  int active_helpers_ = 0;
  bool open_ = false;  // helpers may still join the current call
  int joined_ = 0;
  // Written under mu_; also read without it by threads that spin.
  std::atomic<int> finished_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> spin_{false};
  bool stop_ = false;
  std::exception_ptr error_;
};

// Leaked on purpose: joining threads at exit can deadlock. After fork() the child has none of
// the parent's helper threads (and maybe a mutex a helper held), so it starts a fresh pool;
// DataLoader workers forked after the parent ran a kernel would otherwise wait forever.
std::atomic<Pool*> g_pool{nullptr};

Pool& pool() {
  Pool* p = g_pool.load();
  if (p) return *p;
  static std::once_flag once;
  std::call_once(once, [] { g_pool.store(new Pool()); });
  return *g_pool.load();
}

// ---- the OpenMP team of the libgomp.so.1 already in the process (torch's) ----------------

using GompParallel = void (*)(void (*)(void*), void*, unsigned num_threads, unsigned flags);
using OmpThreadNum = int (*)();

struct Gomp {
  GompParallel parallel;
  OmpThreadNum thread_num;
};

// A forked child must not enter the parent's team: libgomp keeps the parent's (now missing)
// threads in its pool and would wait for them forever. Installed when the library loads, since
// the parent may have used OpenMP through torch before ever calling us.
std::atomic<bool> g_forked{false};

void on_fork_child() {
  g_forked.store(true);
  g_pool.store(new Pool());
}

const int g_fork_handler = pthread_atfork(nullptr, nullptr, on_fork_child);

bool pool_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("IMGTX_FAST_CPU_THREADING");
    std::string mode = v ? v : "";
    for (char& c : mode) c = char(std::tolower(static_cast<unsigned char>(c)));
    return mode == "pool";
  }();
  return forced;
}

// Whether a look for a runtime that was not loaded at the last look is due: at most every
// kRecheck. dlopen(RTLD_NOLOAD) of a library that is not loaded costs ~9 us in this VM, too much
// to pay on every call; torch imported after the NumPy front end ran is seen within kRecheck.
constexpr std::chrono::milliseconds kRecheck{50};

bool recheck_due(std::atomic<int64_t>& next_ns) {
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch()).count();
  int64_t due = next_ns.load(std::memory_order_relaxed);
  if (now < due) return false;
  const int64_t next = now + std::chrono::duration_cast<std::chrono::nanoseconds>(kRecheck).count();
  return next_ns.compare_exchange_strong(due, next, std::memory_order_relaxed);
}

// The team's entry points, or null. Looked up while libgomp is absent (at most every kRecheck
// for kernel calls, always when `now`: torch may be imported after the NumPy front end ran),
// kept once found: the NOLOAD handle holds a reference, so the runtime can never be unloaded
// under us.
const Gomp* team(bool now = false) {
  if (g_forked.load(std::memory_order_relaxed) || pool_forced()) return nullptr;
  static std::atomic<const Gomp*> found{nullptr};
  if (const Gomp* g = found.load(std::memory_order_acquire)) return g;
  static std::atomic<int64_t> next_look{0};
  if (!recheck_due(next_look) && !now) return nullptr;
  void* lib = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (!lib) return nullptr;
  auto parallel = reinterpret_cast<GompParallel>(dlsym(lib, "GOMP_parallel"));
  auto thread_num = reinterpret_cast<OmpThreadNum>(dlsym(lib, "omp_get_thread_num"));
  if (!parallel || !thread_num) {
    dlclose(lib);
    return nullptr;
  }
  static const Gomp gomp{parallel, thread_num};
  found.store(&gomp, std::memory_order_release);
  return &gomp;
}

// Whether an OpenMP runtime is loaded at all (torch's libgomp, or another), whether or not we
// use its team: our pool then must not spin next to its threads.
bool openmp_in_process() {
  static std::atomic<bool> seen{false};
  static std::atomic<int64_t> next_look{0};
  if (seen.load(std::memory_order_relaxed)) return true;
  if (!recheck_due(next_look)) return false;
  for (const char* name : {"libgomp.so.1", "libiomp5.so", "libomp.so"}) {
    if (void* lib = dlopen(name, RTLD_NOW | RTLD_NOLOAD)) {
      dlclose(lib);
      seen.store(true, std::memory_order_relaxed);
      return true;
    }
  }
  return false;
}

std::mutex g_team_mu;  // one parallel_for at a time owns the team; others run serially

struct Region {
  const std::function<void(int64_t, int)>* fn;
  OmpThreadNum thread_num;
  TaskRanges tasks;
  std::mutex err_mu;
  std::exception_ptr error;
};

// The body of the OpenMP region, on each thread of the team (the caller is thread 0).
void region_body(void* data) {
  auto& r = *static_cast<Region*>(data);
  const bool was_inside = t_inside_task;
  t_inside_task = true;  // nested parallel_for calls from a task run inline
  r.tasks.drain(*r.fn, r.thread_num(), r.err_mu, r.error);
  t_inside_task = was_inside;
}

// Returns false (without running anything) when another caller holds the team.
bool try_run_on_team(const Gomp& gomp, int64_t num_tasks, int workers,
                     const std::function<void(int64_t, int)>& fn) {
  std::unique_lock<std::mutex> busy(g_team_mu, std::try_to_lock);
  if (!busy.owns_lock()) return false;
  Region r;
  r.fn = &fn;
  r.tasks.reset(num_tasks, workers);
  r.thread_num = gomp.thread_num;
  // The team has at most `workers` threads, so omp_get_thread_num() is a valid worker id.
  gomp.parallel(region_body, &r, unsigned(workers), 0);
  if (r.error) std::rethrow_exception(r.error);
  return true;
}

}  // namespace

const char* threading_runtime() { return team(/*now=*/true) ? "openmp" : "pool"; }

int parallel_workers(int64_t num_tasks, int num_threads) {
  return int(std::max<int64_t>(1, std::min<int64_t>(num_tasks, std::max(1, num_threads))));
}

void parallel_for(int64_t num_tasks, int num_threads,
                  const std::function<void(int64_t, int)>& fn) {
  if (num_tasks <= 0) return;
  const int workers = parallel_workers(num_tasks, num_threads);
  if (workers > 1 && !t_inside_task) {
    t_inside_task = true;
    bool ran = false;
    try {
      const Gomp* gomp = team();
      ran = gomp ? try_run_on_team(*gomp, num_tasks, workers, fn)
                 : pool().try_run(num_tasks, workers, fn, !openmp_in_process());
    } catch (...) {
      t_inside_task = false;
      throw;
    }
    t_inside_task = false;
    if (ran) return;
  }
  // Serial: one thread, or the pool/team is busy with another caller, or we are inside a task.
  // Worker ids stay within [0, workers) so per-worker scratch sized for `workers` is valid.
  for (int64_t t = 0; t < num_tasks; ++t) fn(t, 0);
}

}  // namespace imgtx
