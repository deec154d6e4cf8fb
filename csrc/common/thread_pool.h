// The library's CPU parallelism: torch's OpenMP team when torch is in the process, else our own
// pool.
//
// Why share torch's team: after every parallel torch op, its OpenMP workers spin for a while
// waiting for the next region. A kernel of ours that runs right after (the normal case inside a
// model) on a pool of its own finds its helpers fighting those spinning threads for the cores.
// When libgomp.so.1 is already loaded (torch's wheel loads it), parallel_for runs its tasks as
// an OpenMP region of that very runtime (GOMP_parallel, found at run time with dlopen(NOLOAD)):
// the spinning threads are the ones that pick our work up. The compiled core links neither
// libtorch nor libgomp, so without torch (the NumPy front end) nothing is loaded and our own
// pool runs, as before. A forked child never enters the parent's team (libgomp has no fork
// handler: its threads are gone in the child); it uses a fresh pool of ours.
// The pool's threads spin for up to 200 us before they sleep, as OpenMP's do, but only when no
// OpenMP runtime is in the process (its own spinning threads would then fight ours).
// IMGTX_FAST_CPU_THREADING=pool forces our own pool (read once). The Python layer passes
// torch.get_num_threads() on every call, so the user's thread setting is respected either way.
#pragma once

#include <cstdint>
#include <functional>

namespace imgtx {

// Runs fn(task, worker) for task in [0, num_tasks) on up to `num_threads` threads (the calling
// thread included); worker is in [0, min(num_threads, num_tasks)). Returns when all tasks are done.
// Worker w starts on the w-th of equal contiguous ranges of tasks (as torch's own parallel ops
// split their rows, so it reads what its core wrote) and then helps with the others'.
// Safe to call from several threads at once and from inside a task: a caller that finds the pool
// busy runs its tasks itself, so concurrent calls never deadlock and never oversubscribe.
void parallel_for(int64_t num_tasks, int num_threads,
                  const std::function<void(int64_t task, int worker)>& fn);

// Number of threads a parallel_for(num_tasks, num_threads, ...) call will use (for sizing
// per-worker scratch buffers before the call).
int parallel_workers(int64_t num_tasks, int num_threads);

// Which runtime the next parallel_for call with more than one worker uses: "openmp" (the team
// of the libgomp.so.1 already in the process) or "pool" (ours).
const char* threading_runtime();

}  // namespace imgtx
