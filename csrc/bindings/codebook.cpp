// Bindings of the codebook-lookup family: pointers arrive as integers (tensor.data_ptr()).
#include <cstdint>

#include "bindings/bindings.h"
#include "imgtx/codebook.h"

namespace imgtx {
namespace bindings {

namespace py = pybind11;

namespace {

CodebookLookupParams make_params(uintptr_t z, int z_dtype, int64_t batch, int64_t rows,
                                 int64_t dim, int64_t z_sb, int64_t z_sr, int64_t z_sd,
                                 uintptr_t cb, int cb_dtype, int64_t num_codes, int64_t cb_sk,
                                 int64_t cb_sd, int metric, uintptr_t indices, uintptr_t quantized,
                                 uintptr_t sqdist, uintptr_t counts) {
  if (z_dtype < 0 || z_dtype > 2 || cb_dtype < 0 || cb_dtype > 2)
    throw py::type_error("codebook_lookup: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  if (metric < 0 || metric > 1)
    throw py::value_error("codebook_lookup: metric code must be 0 (l2) or 1 (cosine)");
  CodebookLookupParams p;
  p.z = reinterpret_cast<const void*>(z);
  p.z_dtype = DType(z_dtype);
  p.batch = batch;
  p.rows = rows;
  p.dim = dim;
  p.z_stride_batch = z_sb;
  p.z_stride_row = z_sr;
  p.z_stride_dim = z_sd;
  p.codebook = reinterpret_cast<const void*>(cb);
  p.codebook_dtype = DType(cb_dtype);
  p.num_codes = num_codes;
  p.cb_stride_code = cb_sk;
  p.cb_stride_dim = cb_sd;
  p.metric = CodebookMetric(metric);
  p.indices = reinterpret_cast<int64_t*>(indices);
  p.quantized = reinterpret_cast<void*>(quantized);
  p.sqdist = reinterpret_cast<float*>(sqdist);
  p.counts = reinterpret_cast<int64_t*>(counts);
  return p;
}

#define IMGTX_CODEBOOK_ARGS                                                                     \
  py::arg("z"), py::arg("z_dtype"), py::arg("batch"), py::arg("rows"), py::arg("dim"),         \
      py::arg("z_stride_batch"), py::arg("z_stride_row"), py::arg("z_stride_dim"),             \
      py::arg("codebook"), py::arg("codebook_dtype"), py::arg("num_codes"),                    \
      py::arg("cb_stride_code"), py::arg("cb_stride_dim"), py::arg("metric"),                  \
      py::arg("indices"), py::arg("quantized"), py::arg("sqdist"), py::arg("counts")

}  // namespace

void register_codebook(py::module_& m) {
  m.def("codebook_counters", [] {
    const CodebookCounters c = codebook_counters();
    py::dict d;
    d["rows_rechecked"] = c.rows_rechecked;
    d["rows_full_search"] = c.rows_full_search;
    d["codes_rechecked"] = c.codes_rechecked;
    return d;
  }, "Rows whose argmin needed a float64 re-check (and its candidate codes) or a full re-search: "
     "CPU calls, and CUDA calls made with IMGTX_FAST_CODEBOOK_STATS=1.");
  m.def("reset_codebook_counters", &reset_codebook_counters);

  m.def(
      "codebook_lookup_cpu",
      [](uintptr_t z, int zt, int64_t b, int64_t r, int64_t d, int64_t sb, int64_t sr,
         int64_t sd, uintptr_t cb, int ct, int64_t k, int64_t sk, int64_t skd, int metric,
         uintptr_t idx, uintptr_t q, uintptr_t sq, uintptr_t counts, int num_threads) {
        const CodebookLookupParams p =
            make_params(z, zt, b, r, d, sb, sr, sd, cb, ct, k, sk, skd, metric, idx, q, sq, counts);
        py::gil_scoped_release release;
        codebook_lookup_cpu(p, num_threads);
      },
      IMGTX_CODEBOOK_ARGS, py::arg("num_threads"));

  m.def(
      "codebook_lookup_cuda_workspace_size",
      [](int64_t b, int64_t r, int64_t d, int64_t k) {
        CodebookLookupParams p;
        p.batch = b;
        p.rows = r;
        p.dim = d;
        p.num_codes = k;
        return codebook_lookup_cuda_workspace_size(p);
      },
      py::arg("batch"), py::arg("rows"), py::arg("dim"), py::arg("num_codes"));

  m.def(
      "codebook_lookup_cuda",
      [](uintptr_t z, int zt, int64_t b, int64_t r, int64_t d, int64_t sb, int64_t sr,
         int64_t sd, uintptr_t cb, int ct, int64_t k, int64_t sk, int64_t skd, int metric,
         uintptr_t idx, uintptr_t q, uintptr_t sq, uintptr_t counts, uintptr_t workspace,
         uintptr_t stream) {
        const CodebookLookupParams p =
            make_params(z, zt, b, r, d, sb, sr, sd, cb, ct, k, sk, skd, metric, idx, q, sq, counts);
        py::gil_scoped_release release;
        codebook_lookup_cuda(p, reinterpret_cast<void*>(workspace), reinterpret_cast<void*>(stream));
      },
      IMGTX_CODEBOOK_ARGS, py::arg("workspace"), py::arg("stream"));
}

}  // namespace bindings
}  // namespace imgtx
