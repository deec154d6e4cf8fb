// The C++ core tests' one assertion helper and counters (shared by every tests/cpp file).
#pragma once

#include <cstdio>
#include <functional>
#include <string>

#include "common/cpu_features.h"

namespace imgtx_test {

inline int g_passed = 0, g_failed = 0;

inline void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL: %s\n", what.c_str());
  }
}

// Runs fn(name) once per CPU path this binary and CPU support, with that path active.
inline void for_each_cpu_isa(const std::function<void(const std::string&)>& fn) {
  for (const char* isa : {"portable", "avx2", "avx512"}) {
    const std::string name(isa);
    const imgtx::CpuIsa id = name == "avx512" ? imgtx::CpuIsa::kAvx512
                             : name == "avx2" ? imgtx::CpuIsa::kAvx2
                                              : imgtx::CpuIsa::kPortable;
    if (!imgtx::cpu_isa_supported(id)) continue;
    imgtx::set_cpu_isa(isa);
    fn(name);
  }
}

}  // namespace imgtx_test
