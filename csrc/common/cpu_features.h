// Run-time choice of the CPU code path.
#pragma once

#include <string>

namespace imgtx {

enum class CpuIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// What this binary was built with and what the running CPU supports.
bool cpu_isa_compiled(CpuIsa isa);
bool cpu_isa_supported(CpuIsa isa);

// The path kernels use now: the best supported one, unless the environment variable
// IMGTX_FAST_CPU_ISA=portable|avx2|avx512 (any case) or set_cpu_isa() chose another.
CpuIsa active_cpu_isa();
// Why IMGTX_FAST_CPU_ISA was ignored (an unknown name, or a path this CPU/binary cannot run),
// one line; "" when it is unset or used.
std::string cpu_isa_env_warning();
// Names in any case. Throws std::invalid_argument for an unknown name or a path this
// CPU/binary cannot run.
void set_cpu_isa(const std::string& name);
const char* cpu_isa_name(CpuIsa isa);

}  // namespace imgtx
