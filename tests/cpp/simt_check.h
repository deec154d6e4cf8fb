// Assertions about emulated launches, shared by the emulator's tests (tests/cpp/test_simt*.cpp):
// a launch that must fail with simt::KernelError for one reason, one that must run cleanly, and
// one that must be refused with a CUDA error code.
#pragma once

#include <cuda_runtime.h>

#include <initializer_list>
#include <string>

#include "check.h"
#include "simt/simt.h"

namespace imgtx_test {

// `launch` must throw simt::KernelError whose message names `kernel` (as the launch macro spells
// it) and contains every entry of `needles`; an entry "a|b" accepts either text. Naming the
// kernel and the problem is what makes a report actionable, so both are checked, and the
// problem text keeps a test from passing on some other, unintended failure.
template <class Launch>
void expect_kernel_error(Launch&& launch, const std::string& kernel,
                         std::initializer_list<const char*> needles, const std::string& what) {
  std::string msg;
  bool threw = false;
  try {
    launch();
  } catch (const simt::KernelError& e) {
    threw = true;
    msg = e.what();
  }
  check(threw, what + ": raises simt::KernelError");
  if (!threw) return;
  check(msg.find("`" + kernel + "`") != std::string::npos, what + ": names the kernel: " + msg);
  for (const char* needle : needles) {
    bool found = false;
    const std::string alternatives(needle);
    for (size_t start = 0; start <= alternatives.size();) {
      const size_t bar = alternatives.find('|', start);
      const size_t end = bar == std::string::npos ? alternatives.size() : bar;
      if (msg.find(alternatives.substr(start, end - start)) != std::string::npos) found = true;
      start = end + 1;
    }
    check(found, what + ": says '" + alternatives + "': " + msg);
  }
}

// `launch` must run without a KernelError and without a launch error.
template <class Launch>
bool expect_clean(Launch&& launch, const std::string& what) {
  cudaGetLastError();
  std::string msg;
  try {
    launch();
  } catch (const simt::KernelError& e) {
    msg = e.what();
  }
  const cudaError_t err = cudaGetLastError();
  check(msg.empty(), what + ": runs without a kernel error" + (msg.empty() ? "" : ": " + msg));
  check(err == cudaSuccess, what + ": launches (" + cudaGetErrorString(err) + ")");
  return msg.empty() && err == cudaSuccess;
}

// The error cudaGetLastError reports for `launch` (which must not throw: a refused launch never
// runs), with the sticky error cleared before and after.
template <class Launch>
cudaError_t launch_error(Launch&& launch) {
  cudaGetLastError();
  launch();
  return cudaGetLastError();
}

}  // namespace imgtx_test
