// Build and runtime facts for `python -m imgtx_fast info` and the CPU-path switch used by tests.
#include <string>

#include "bindings/bindings.h"
#include "common/cpu_features.h"
#include "common/thread_pool.h"

#ifdef IMGTX_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace imgtx {
namespace bindings {

namespace py = pybind11;

namespace {

#ifdef IMGTX_HAVE_CUDA
// "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime version"
std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}
#endif

// What the CUDA runtime linked into this module sees. It is this runtime's driver floor that
// decides whether our kernels run, not the one of torch's own (possibly older) runtime.
py::dict cuda_query() {
  int driver = 0, runtime = 0;
  std::string error;
  py::list devices;
#ifdef IMGTX_HAVE_CUDA
  cudaDriverGetVersion(&driver);  // 0 when no driver is installed; works with any driver
  cudaRuntimeGetVersion(&runtime);
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);  // fails on a driver older than the runtime
  for (int i = 0; err == cudaSuccess && i < count; ++i) {
    cudaDeviceProp prop;
    err = cudaGetDeviceProperties(&prop, i);
    if (err == cudaSuccess)
      devices.append(py::dict(py::arg("name") = std::string(prop.name),
                              py::arg("capability") = py::make_tuple(prop.major, prop.minor)));
  }
  // "no device" is an answer, not an error
  if (err != cudaSuccess && err != cudaErrorNoDevice) error = cuda_error_text(err);
  cudaGetLastError();  // clear a sticky error for the kernels' own checks
#endif
  return py::dict(py::arg("driver_version") = driver, py::arg("runtime_version") = runtime,
                  py::arg("devices") = devices, py::arg("error") = error);
}

}  // namespace

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
  m.def("cpu_isa_env_warning", &cpu_isa_env_warning,
        "Why IMGTX_FAST_CPU_ISA was ignored (an unknown name or a path this CPU/build cannot "
        "run), or '' when it is unset or in use.");
  m.def("cpu_threading", [] { return std::string(threading_runtime()); },
        "The runtime of the CPU kernels' parallel work: 'openmp' (the team of the libgomp.so.1 "
        "already in the process, torch's) or 'pool' (the library's own threads).");
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
  m.def("cuda_query", &cuda_query,
        "The CUDA driver and runtime versions (1000 * major + 10 * minor; driver 0: none "
        "installed), the visible devices (name, compute capability) and the error, if any, "
        "of querying them. Without CUDA compiled: zeros and no devices.");
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
