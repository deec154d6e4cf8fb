#include "common/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <vector>

namespace imgtx {
namespace {

thread_local bool t_inside_task = false;

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
  bool try_run(int64_t num_tasks, int workers, const std::function<void(int64_t, int)>& fn) {
    std::unique_lock<std::mutex> busy(busy_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    grow(workers - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      num_tasks_ = num_tasks;
      next_task_.store(0);
      active_helpers_ = workers - 1;
      open_ = true;
      joined_ = finished_ = 0;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lk(mu_);
    open_ = false;
    done_cv_.wait(lk, [&] { return finished_ == joined_; });
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
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || (generation_ != seen && id <= active_helpers_); });
        if (stop_) return;
        seen = generation_;
        if (!open_) continue;  // woke after the caller finished: nothing left to join
        ++joined_;
      }
      work(id);
      std::lock_guard<std::mutex> lk(mu_);
      if (++finished_ == joined_) done_cv_.notify_one();
    }
  }

  void work(int worker) {
    for (;;) {
      const int64_t t = next_task_.fetch_add(1);
      if (t >= num_tasks_) return;
      try {
        (*fn_)(t, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_mu_);
        if (!error_) error_ = std::current_exception();
        next_task_.store(num_tasks_);  // stop handing out tasks
      }
    }
  }

  std::mutex busy_mu_;  // one parallel_for at a time owns the helpers
  std::mutex mu_, err_mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_task_{0};
  int active_helpers_ = 0;
  bool open_ = false;  // helpers may still join the current call
  int joined_ = 0, finished_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

// Leaked on purpose: joining threads at exit can deadlock. After fork() the child has none of
// the parent's helper threads (and maybe a mutex a helper held), so it starts a fresh pool;
// DataLoader workers forked after the parent ran a kernel would otherwise wait forever.
std::atomic<Pool*> g_pool{nullptr};

void reset_pool_in_child() { g_pool.store(new Pool()); }

Pool& pool() {
  Pool* p = g_pool.load();
  if (p) return *p;
  static std::once_flag once;
  std::call_once(once, [] {
    g_pool.store(new Pool());
    pthread_atfork(nullptr, nullptr, reset_pool_in_child);
  });
  return *g_pool.load();
}

}  // namespace

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
      ran = pool().try_run(num_tasks, workers, fn);
    } catch (...) {
      t_inside_task = false;
      throw;
    }
    t_inside_task = false;
    if (ran) return;
  }
  // Serial: one thread, or the pool is busy with another caller, or we are inside a task.
  // Worker ids stay within [0, workers) so per-worker scratch sized for `workers` is valid.
  for (int64_t t = 0; t < num_tasks; ++t) fn(t, 0);
}

}  // namespace imgtx
