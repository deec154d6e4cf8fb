#include "common/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace imgtx {
namespace {

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

CpuIsa parse(const std::string& name) {
  if (name == "portable") return CpuIsa::kPortable;
  if (name == "avx2") return CpuIsa::kAvx2;
  throw std::invalid_argument("unknown CPU path '" + name + "' (expected 'portable' or 'avx2')");
}

CpuIsa best_isa() {
  return cpu_isa_supported(CpuIsa::kAvx2) ? CpuIsa::kAvx2 : CpuIsa::kPortable;
}

CpuIsa initial_isa() {
  const char* env = std::getenv("IMGTX_FAST_CPU_ISA");
  if (env && *env) {
    const CpuIsa want = parse(env);
    if (cpu_isa_supported(want)) return want;
  }
  return best_isa();
}

std::atomic<int>& isa_slot() {
  static std::atomic<int> slot{int(initial_isa())};
  return slot;
}

}  // namespace

bool cpu_isa_compiled(CpuIsa isa) {
  if (isa == CpuIsa::kPortable) return true;
#ifdef IMGTX_HAVE_AVX2
  return true;
#else
  return false;
#endif
}

bool cpu_isa_supported(CpuIsa isa) {
  if (!cpu_isa_compiled(isa)) return false;
  return isa == CpuIsa::kPortable || cpu_has_avx2_fma();
}

CpuIsa active_cpu_isa() { return CpuIsa(isa_slot().load()); }

void set_cpu_isa(const std::string& name) {
  const CpuIsa want = parse(name);
  if (!cpu_isa_supported(want))
    throw std::invalid_argument("CPU path '" + name + "' is not available in this build/CPU");
  isa_slot().store(int(want));
}

const char* cpu_isa_name(CpuIsa isa) { return isa == CpuIsa::kAvx2 ? "avx2" : "portable"; }

}  // namespace imgtx
