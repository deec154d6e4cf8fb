// Fibers: each emulated CUDA thread runs on its own stack, and the scheduler switches between
// them in user space. x86-64 uses a hand-written switch (callee-saved registers, MXCSR and the
// x87 control word: about 10 ns), other hosts ucontext (correct, ~50x slower: it makes a
// syscall per switch). Under AddressSanitizer every switch is announced to it
// (__sanitizer_start/finish_switch_fiber), so ASan tracks the fiber stacks correctly.
#include <cstdlib>
#include <cstring>

#include "simt/internal.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#endif

#if defined(__x86_64__)
extern "C" void simt_ctx_switch(void** save_sp, void* to_sp);
extern "C" void simt_ctx_start();
asm(R"(
  .text
  .p2align 4
  .globl simt_ctx_switch
  .hidden simt_ctx_switch
  .type simt_ctx_switch,@function
simt_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_ctx_switch, .-simt_ctx_switch

  .p2align 4
  .globl simt_ctx_start
  .hidden simt_ctx_start
  .type simt_ctx_start,@function
simt_ctx_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size simt_ctx_start, .-simt_ctx_start
)");
#else
#include <ucontext.h>
#endif

namespace simt {
namespace {

#if defined(SIMT_ASAN)
thread_local const void* t_sched_bottom = nullptr;
thread_local size_t t_sched_size = 0;
#endif

#if !defined(__x86_64__)
struct UContextFiber {
  ucontext_t ctx;
};
thread_local UContextFiber t_sched_ctx;
#endif

}  // namespace

void fiber_init(Thread& t, void (*entry)(void*), void* arg) {
#if defined(SIMT_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(t.stack, t.stack_size);  // frames of fibers abandoned mid-run
#endif
#if defined(__x86_64__)
  uintptr_t top = (reinterpret_cast<uintptr_t>(t.stack) + t.stack_size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 64);
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  std::memcpy(&sp[0], csr, 8);
  sp[1] = 0;                                   // r15
  sp[2] = 0;                                   // r14
  sp[3] = reinterpret_cast<uint64_t>(entry);   // r13
  sp[4] = reinterpret_cast<uint64_t>(arg);     // r12
  sp[5] = 0;                                   // rbx
  sp[6] = 0;                                   // rbp
  sp[7] = reinterpret_cast<uint64_t>(&simt_ctx_start);
  t.sp = sp;
#else
  UContextFiber* f = static_cast<UContextFiber*>(std::malloc(sizeof(UContextFiber)));
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = t.stack;
  f->ctx.uc_stack.ss_size = t.stack_size;
  f->ctx.uc_link = nullptr;
  makecontext(&f->ctx, reinterpret_cast<void (*)()>(entry), 1, arg);  // one pointer argument
  std::free(t.sp);
  t.sp = f;
#endif
}

// Switches from the running context (saved into *save_sp) to to_sp. to_stack/to_size describe
// the target's stack for ASan (nullptr: the scheduler's own stack).
void fiber_switch(void** save_sp, void* to_sp, const char* to_stack, size_t to_size, bool dying) {
#if defined(SIMT_ASAN)
  void* fake = nullptr;
  const void* bottom = to_stack ? static_cast<const void*>(to_stack) : t_sched_bottom;
  const size_t size = to_stack ? to_size : t_sched_size;
  // A fiber that will never run again says so (null), so ASan frees its fake stack: otherwise
  // every emulated thread of every block would keep one (detect_stack_use_after_return).
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake, bottom, size);
#else
  (void)dying;
  (void)to_stack;
  (void)to_size;
#endif
#if defined(__x86_64__)
  simt_ctx_switch(save_sp, to_sp);
#else
  UContextFiber* to = to_sp ? static_cast<UContextFiber*>(to_sp) : &t_sched_ctx;
  UContextFiber* from = *save_sp ? static_cast<UContextFiber*>(*save_sp) : &t_sched_ctx;
  swapcontext(&from->ctx, &to->ctx);
#endif
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// Called first thing in a new fiber: completes the switch ASan saw start in the scheduler, and
// learns the scheduler's stack (the one switched away from).
void fiber_enter_scheduler_info() {
#if defined(SIMT_ASAN)
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
  if (bottom) {
    t_sched_bottom = bottom;
    t_sched_size = size;
  }
#endif
}

}  // namespace simt
