#include "common/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace imgtx {
namespace {

bool cpu_supports(CpuIsa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == CpuIsa::kAvx2) return avx2;
  if (isa == CpuIsa::kAvx512) return avx2 && __builtin_cpu_supports("avx512f");
#endif
  return isa == CpuIsa::kPortable;
}

CpuIsa parse(const std::string& name) {
  if (name == "portable") return CpuIsa::kPortable;
  if (name == "avx2") return CpuIsa::kAvx2;
  if (name == "avx512") return CpuIsa::kAvx512;
  throw std::invalid_argument("unknown CPU path '" + name +
                              "' (expected 'portable', 'avx2' or 'avx512')");
}

CpuIsa best_isa() {
  for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx2})
    if (cpu_isa_supported(isa)) return isa;
  return CpuIsa::kPortable;
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
#ifdef IMGTX_HAVE_X86_KERNELS
  return true;
#else
  return false;
#endif
}

bool cpu_isa_supported(CpuIsa isa) { return cpu_isa_compiled(isa) && cpu_supports(isa); }

CpuIsa active_cpu_isa() { return CpuIsa(isa_slot().load()); }

void set_cpu_isa(const std::string& name) {
  const CpuIsa want = parse(name);
  if (!cpu_isa_supported(want))
    throw std::invalid_argument("CPU path '" + name + "' is not available in this build/CPU");
  isa_slot().store(int(want));
}

const char* cpu_isa_name(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? "avx512" : isa == CpuIsa::kAvx2 ? "avx2" : "portable";
}

}  // namespace imgtx
