// The library's CPU thread pool.
//
// Why our own pool instead of OpenMP: torch ships its own libgomp, and a second OpenMP runtime
// in the process oversubscribes cores and ties our binary to a runtime. The Python layer passes
// torch.get_num_threads() on every call, so the user's thread setting is respected.
#pragma once

#include <cstdint>
#include <functional>

namespace imgtx {

// Runs fn(task, worker) for task in [0, num_tasks) on up to `num_threads` threads (the calling
// thread included); worker is in [0, min(num_threads, num_tasks)). Returns when all tasks are done.
// Safe to call from several threads at once and from inside a task: a caller that finds the pool
// busy runs its tasks itself, so concurrent calls never deadlock and never oversubscribe.
void parallel_for(int64_t num_tasks, int num_threads,
                  const std::function<void(int64_t task, int worker)>& fn);

// Number of threads a parallel_for(num_tasks, num_threads, ...) call will use (for sizing
// per-worker scratch buffers before the call).
int parallel_workers(int64_t num_tasks, int num_threads);

}  // namespace imgtx
