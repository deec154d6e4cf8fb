// Build and runtime facts for `python -m imgtx_fast info` and the CPU-path switch used by tests.
#include <string>

#include "bindings/bindings.h"
#include "common/cpu_features.h"

#ifdef IMGTX_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace imgtx {
namespace bindings {

namespace py = pybind11;

void register_info(py::module_& m) {
  m.def("cpu_isa", [] { return std::string(cpu_isa_name(active_cpu_isa())); },
        "The CPU code path in use: 'avx512' (AVX-512F), 'avx2' (AVX2+FMA) or 'portable'.");
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"),
        "Force the CPU code path ('portable', 'avx2', 'avx512'); ValueError if unavailable.");
  m.def("cpu_isas_available", [] {
    py::list out;
    for (CpuIsa isa : {CpuIsa::kPortable, CpuIsa::kAvx2, CpuIsa::kAvx512})
      if (cpu_isa_supported(isa)) out.append(cpu_isa_name(isa));
    return out;
  });
  m.def("cuda_compiled", [] {
#ifdef IMGTX_HAVE_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_archs", [] {
#ifdef IMGTX_HAVE_CUDA
    return std::string(IMGTX_CUDA_ARCHS);
#else
    return std::string();
#endif
  });
  m.def("cuda_device_count", [] {
#ifdef IMGTX_HAVE_CUDA
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device" error
      return 0;
    }
    return n;
#else
    return 0;
#endif
  });
}

}  // namespace bindings
}  // namespace imgtx
