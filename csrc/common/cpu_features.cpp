#include "common/cpu_features.h"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <stdexcept>
#include <string>

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

// The path a name means, in any case ("AVX2" as well), or false for an unknown name.
bool lookup(const std::string& name, CpuIsa* isa) {
  std::string lower;
  for (char c : name) lower += char(std::tolower(static_cast<unsigned char>(c)));
  for (CpuIsa candidate : {CpuIsa::kPortable, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (lower == cpu_isa_name(candidate)) {
      *isa = candidate;
      return true;
    }
  }
  return false;
}

CpuIsa parse(const std::string& name) {
  CpuIsa isa;
  if (!lookup(name, &isa))
    throw std::invalid_argument("unknown CPU path '" + name +
                                "' (expected 'portable', 'avx2' or 'avx512', any case)");
  return isa;
}

CpuIsa best_isa() {
  for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx2})
    if (cpu_isa_supported(isa)) return isa;
  return CpuIsa::kPortable;
}

// What was wrong with IMGTX_FAST_CPU_ISA when it was read ("" when nothing). Like
// ATEN_CPU_CAPABILITY, a value that cannot be used is ignored with a warning (the Python
// package shows this text once at import), never an error.
std::string& env_warning() {
  static std::string text;
  return text;
}

CpuIsa initial_isa() {
  const CpuIsa best = best_isa();
  const char* env = std::getenv("IMGTX_FAST_CPU_ISA");
  if (!env || !*env) return best;
  CpuIsa want;
  const std::string prefix = std::string("IMGTX_FAST_CPU_ISA='") + env + "' ";
  if (!lookup(env, &want)) {
    env_warning() = prefix + "is not one of portable, avx2, avx512 (any case); using " +
                    cpu_isa_name(best) + ", the best path this CPU supports";
    return best;
  }
  if (!cpu_isa_supported(want)) {
    env_warning() = prefix + "is not available on this CPU/build; using " + cpu_isa_name(best);
    return best;
  }
  return want;
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

std::string cpu_isa_env_warning() {
  isa_slot();  // reads the variable on first use
  return env_warning();
}

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
