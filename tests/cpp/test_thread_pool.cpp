// parallel_for: every task runs exactly once, on a worker id below parallel_workers(); the
// tasks are handed out as one contiguous range per worker (a helper starts on its own range);
// an exception in a task reaches the caller and leaves the pool usable. (No libgomp in this binary: these run our own pool;
// tests/test_cpu_threading.py covers torch's OpenMP team.)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "common/thread_pool.h"

using imgtx_test::check;

namespace {

void test_each_task_once(int64_t tasks, int threads) {
  const int workers = imgtx::parallel_workers(tasks, threads);
  std::vector<std::atomic<int>> runs(size_t(std::max<int64_t>(tasks, 1)));
  std::atomic<bool> ids_ok{true};
  imgtx::parallel_for(tasks, threads, [&](int64_t t, int w) {
    runs[size_t(t)].fetch_add(1);
    if (w < 0 || w >= workers) ids_ok.store(false);
  });
  const std::string what = "tasks=" + std::to_string(tasks) + " threads=" + std::to_string(threads);
  bool once = true;
  for (int64_t t = 0; t < tasks; ++t) once &= runs[size_t(t)].load() == 1;
  check(once, "parallel_for runs every task exactly once, " + what);
  check(ids_ok, "parallel_for worker ids are below parallel_workers(), " + what);
}

void test_first_tasks_are_range_starts() {
  // Worker 0 holds task 0 until worker 1 (a pool helper) has started, or 5 s have passed: the
  // helper's first task is then the start of its own range (task 4 of 8), not task 1 as a
  // shared counter would hand out.
  std::atomic<int> first1{-1};
  std::atomic<int> first0{-1};
  imgtx::parallel_for(8, 2, [&](int64_t t, int w) {
    if (w == 1) {
      int none = -1;
      first1.compare_exchange_strong(none, int(t));
    } else if (first0.load() < 0) {
      first0.store(int(t));
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (first1.load() < 0 && std::chrono::steady_clock::now() < until) std::this_thread::yield();
    }
  });
  // A worker that ran nothing (-1): its range was taken by the other before it started.
  check(first0.load() == 0 || first0.load() == -1,
        "worker 0 starts with task 0, got " + std::to_string(first0.load()));
  check(first1.load() == 4 || first1.load() == -1,
        "worker 1 starts with task 4 (its range), got " + std::to_string(first1.load()));
  check(first0.load() >= 0 || first1.load() >= 0, "some worker ran the tasks");
}

void test_exception_reaches_the_caller() {
  bool threw = false;
  try {
    imgtx::parallel_for(100, 2, [](int64_t t, int) {
      if (t == 57) throw std::runtime_error("task 57");
    });
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()) == "task 57";
  }
  check(threw, "parallel_for rethrows a task's exception in the caller");
  std::atomic<int64_t> sum{0};
  imgtx::parallel_for(100, 2, [&](int64_t t, int) { sum.fetch_add(t); });
  check(sum.load() == 4950, "parallel_for works again after an exception");
}

}  // namespace

void run_thread_pool_tests() {
  for (int threads : {1, 2, 3, 8})
    for (int64_t tasks : {0, 1, 2, 3, 7, 64, 1001}) test_each_task_once(tasks, threads);
  test_first_tasks_are_range_starts();
  test_exception_reaches_the_caller();
}
