// The C++ core tests' one assertion helper and counters (shared by every tests/cpp file).
#pragma once

#include <cstdio>
#include <string>

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

}  // namespace imgtx_test
