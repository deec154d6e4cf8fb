// Linked into _C only with a static libstdc++ (IMGTX_FAST_STATIC_LIBSTDCXX, release wheels).
//
// Any use of the standard exception classes pulls libstdc++.a's string instantiations, and
// with them random.o (std::random_device), which calls arc4random: a glibc 2.36 symbol, that
// alone would raise the wheel from manylinux_2_34 to manylinux_2_36. A definition here binds
// that reference inside _C instead of to libc. Nothing in imgtx_fast uses std::random_device;
// this is still a correct arc4random (the kernel's CSPRNG, as glibc's own).
#include <sys/random.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>

extern "C" __attribute__((visibility("hidden"))) uint32_t arc4random(void) {
  uint32_t value;
  for (;;) {
    ssize_t got = getrandom(&value, sizeof value, 0);  // glibc 2.25
    if (got == static_cast<ssize_t>(sizeof value)) return value;
    if (got < 0 && errno != EINTR) std::abort();  // as glibc's arc4random: no silent weak value
  }
}
