// imgtx_fast._C_simt: the CUDA host entry points of every kernel family, with the kernels running
// under the emulator on CPU memory (imgtx_fast.testing.emulated_cuda routes the torch ops here),
// plus the emulator's settings, counters and the conversions its tests check.
#include <cstdint>

#include "bindings/bindings.h"
#include "simt/float16.h"
#include "simt/simt.h"

namespace py = pybind11;

PYBIND11_MODULE(_C_simt, m) {
  m.doc() = "imgtx_fast's CUDA kernels compiled for the CPU-side CUDA emulator (simt)";
  imgtx::bindings::register_codebook(m);
  imgtx::bindings::register_diffusion(m);
  imgtx::bindings::register_attention(m);

  m.def("configure", [](uint64_t seed, int arch, uint64_t sample_blocks) {
    if (arch != 80 && arch != 86 && arch != 89 && arch != 90)
      throw py::value_error("emulated_cuda: arch must be one of 80, 86, 89, 90; got " + std::to_string(arch));
    simt::reseed(seed);
    simt::settings().arch = arch;
    simt::settings().sample_blocks = sample_blocks;
  }, py::arg("seed"), py::arg("arch"), py::arg("sample_blocks") = 0,
     "Seed of the block and thread order, the emulated sm_XX, and (cost-model runs) how many "
     "blocks of each launch to run (0: all).");
  m.def("settings", [] {
    py::dict d;
    d["seed"] = simt::settings().seed;
    d["arch"] = simt::settings().arch;
    d["sample_blocks"] = simt::settings().sample_blocks;
    return d;
  });
  m.def("launch_log", [] {
    py::list out;
    for (const simt::LaunchRecord& r : simt::launch_log()) {
      py::dict d;
      d["kernel"] = r.kernel;
      d["site"] = r.site;
      d["grid"] = py::make_tuple(r.grid.x, r.grid.y, r.grid.z);
      d["block"] = py::make_tuple(r.block.x, r.block.y, r.block.z);
      d["dynamic_smem"] = r.dynamic_smem;
      d["static_smem"] = r.static_smem;
      d["blocks_total"] = r.blocks_total;
      d["blocks_run"] = r.blocks_run;
      d["barriers"] = r.counts.barriers;
      d["collectives"] = r.counts.collectives;
      d["mma"] = r.counts.mma;
      d["shared_bytes_loaded"] = r.counts.shared_bytes_loaded;
      d["shared_bytes_stored"] = r.counts.shared_bytes_stored;
      d["global_bytes_loaded"] = r.counts.global_bytes_loaded;
      d["global_bytes_stored"] = r.counts.global_bytes_stored;
      out.append(d);
    }
    return out;
  }, "One record per launch since the last clear_launch_log(): configuration and counts "
     "(scaled to the whole grid when blocks were sampled).");
  m.def("clear_launch_log", [] { simt::launch_log().clear(); });
  m.def("counters", [] {
    const simt::Counters& c = simt::counters();
    py::dict d;
    d["launches"] = c.launches;
    d["blocks"] = c.blocks;
    d["threads"] = c.threads;
    d["barriers"] = c.barriers;
    d["collectives"] = c.collectives;
    d["mma"] = c.mma;
    d["shared_bytes_loaded"] = c.shared_bytes_loaded;
    d["shared_bytes_stored"] = c.shared_bytes_stored;
    d["global_bytes_loaded"] = c.global_bytes_loaded;
    d["global_bytes_stored"] = c.global_bytes_stored;
    return d;
  }, "Totals since the last reset_counters().");
  m.def("reset_counters", [] { simt::counters() = simt::Counters{}; });
  m.def("access_hooks", [] {
#if defined(IMGTX_SIMT_ACCESS_HOOKS)
    return true;
#else
    return false;
#endif
  }, "Whether the kernels' memory accesses are instrumented (race detector, traffic counters).");

  // The emulated GPU's fp16/bf16 conversions over n elements (pointers as integers).
  m.def("f32_to_f16_bits", [](uintptr_t src, uintptr_t dst, int64_t n) {
    const float* s = reinterpret_cast<const float*>(src);
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = simt::f32_to_f16_bits(s[i]);
  });
  m.def("f32_to_bf16_bits", [](uintptr_t src, uintptr_t dst, int64_t n) {
    const float* s = reinterpret_cast<const float*>(src);
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = simt::f32_to_bf16_bits(s[i]);
  });
  m.def("f16_bits_to_f32", [](uintptr_t src, uintptr_t dst, int64_t n) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    float* d = reinterpret_cast<float*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = simt::f16_bits_to_f32(s[i]);
  });
  m.def("bf16_bits_to_f32", [](uintptr_t src, uintptr_t dst, int64_t n) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    float* d = reinterpret_cast<float*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = simt::bf16_bits_to_f32(s[i]);
  });
}
