// Bindings of the mask-and-replace diffusion family. Tensors arrive as tuples of integers:
// logits (ptr, dtype, stride_batch, stride_class, stride_token), indices (ptr, stride_batch,
// stride_token), outputs as bare pointers (contiguous) or (ptr, strides...).
#include <cstdint>
#include <tuple>

#include <pybind11/stl.h>

#include "bindings/bindings.h"
#include "imgtx/diffusion.h"

namespace imgtx {
namespace bindings {

namespace py = pybind11;

namespace {

using LogitsArg = std::tuple<uintptr_t, int, int64_t, int64_t, int64_t>;
using IndexArg = std::tuple<uintptr_t, int64_t, int64_t>;
using StridedOut = std::tuple<uintptr_t, int64_t, int64_t, int64_t>;

MrLogits to_logits(const LogitsArg& a) {
  const int dtype = std::get<1>(a);
  if (dtype < 0 || dtype > 2)
    throw py::type_error("mask-and-replace: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
  MrLogits l;
  l.data = reinterpret_cast<const void*>(std::get<0>(a));
  l.dtype = DType(dtype);
  l.stride_batch = std::get<2>(a);
  l.stride_class = std::get<3>(a);
  l.stride_token = std::get<4>(a);
  return l;
}

MrIndices to_indices(const IndexArg& a) {
  MrIndices x;
  x.data = reinterpret_cast<const int64_t*>(std::get<0>(a));
  x.stride_batch = std::get<1>(a);
  x.stride_token = std::get<2>(a);
  return x;
}

template <class T>
T* ptr(uintptr_t v) { return reinterpret_cast<T*>(v); }

MrPosteriorParams posterior_params(int64_t batch, int64_t K, int64_t tokens,
                                   const LogitsArg& logp, const LogitsArg& uncond,
                                   float guidance, float truncation, const IndexArg& x_t,
                                   uintptr_t coefs, uintptr_t x_prev, const StridedOut& log_probs,
                                   uintptr_t seed) {
  MrPosteriorParams p;
  p.batch = batch;
  p.num_classes = K;
  p.tokens = tokens;
  p.logp = to_logits(logp);
  if (std::get<0>(uncond)) p.logp_uncond = to_logits(uncond);
  p.guidance_scale = guidance;
  p.truncation_rate = truncation;
  p.x_t = to_indices(x_t);
  p.coefs = ptr<const double>(coefs);
  p.x_prev = ptr<int64_t>(x_prev);
  p.log_probs = ptr<float>(std::get<0>(log_probs));
  p.out_stride_batch = std::get<1>(log_probs);
  p.out_stride_class = std::get<2>(log_probs);
  p.out_stride_token = std::get<3>(log_probs);
  p.seed = ptr<const int64_t>(seed);
  return p;
}

MrVbParams vb_params(int64_t batch, int64_t K, int64_t tokens, const LogitsArg& logits,
                     const IndexArg& x0, const IndexArg& x_t, uintptr_t coefs, uintptr_t saved) {
  MrVbParams p;
  p.batch = batch;
  p.num_classes = K;
  p.tokens = tokens;
  p.logits = to_logits(logits);
  p.x0 = to_indices(x0);
  p.x_t = to_indices(x_t);
  p.coefs = ptr<const double>(coefs);
  p.saved = ptr<double>(saved);
  return p;
}

MrQSampleParams q_sample_params(int64_t batch, int64_t K, int64_t tokens, const IndexArg& x0,
                                uintptr_t coefs, uintptr_t seed, uintptr_t x_t) {
  MrQSampleParams p;
  p.batch = batch;
  p.num_classes = K;
  p.tokens = tokens;
  p.x0 = to_indices(x0);
  p.coefs = ptr<const double>(coefs);
  p.seed = ptr<const int64_t>(seed);
  p.x_t = ptr<int64_t>(x_t);
  return p;
}

void set_backward(MrVbParams* p, uintptr_t grad_vb, uintptr_t grad_aux,
                  const StridedOut& grad) {
  p->grad_vb = ptr<const float>(grad_vb);
  p->grad_aux = ptr<const float>(grad_aux);
  p->grad_logits = ptr<void>(std::get<0>(grad));
  p->grad_stride_batch = std::get<1>(grad);
  p->grad_stride_class = std::get<2>(grad);
  p->grad_stride_token = std::get<3>(grad);
}

#define IMGTX_POSTERIOR_ARGS                                                                  \
  py::arg("batch"), py::arg("num_classes"), py::arg("tokens"), py::arg("logp"),              \
      py::arg("logp_uncond"), py::arg("guidance_scale"), py::arg("truncation_rate"),          \
      py::arg("x_t"), py::arg("coefs"), py::arg("x_prev"), py::arg("log_probs"), py::arg("seed")
#define IMGTX_VB_ARGS                                                                         \
  py::arg("batch"), py::arg("num_classes"), py::arg("tokens"), py::arg("logits"),            \
      py::arg("x0"), py::arg("x_t"), py::arg("coefs"), py::arg("saved")

}  // namespace

void register_diffusion(py::module_& m) {
  m.attr("MR_COEFS") = int(kMrCoefs);
  m.attr("MR_VB_SAVED") = int(kMrVbSaved);

  m.def("mr_posterior_cpu",
        [](int64_t batch, int64_t K, int64_t tokens, const LogitsArg& logp,
           const LogitsArg& uncond, float guidance, float truncation, const IndexArg& x_t,
           uintptr_t coefs, uintptr_t x_prev, const StridedOut& log_probs, uintptr_t seed,
           int num_threads) {
          const MrPosteriorParams p = posterior_params(batch, K, tokens, logp, uncond, guidance,
                                                       truncation, x_t, coefs, x_prev,
                                                       log_probs, seed);
          py::gil_scoped_release release;
          return mr_posterior_cpu(p, num_threads);
        },
        IMGTX_POSTERIOR_ARGS, py::arg("num_threads"));
  m.def("mr_posterior_cuda",
        [](int64_t batch, int64_t K, int64_t tokens, const LogitsArg& logp,
           const LogitsArg& uncond, float guidance, float truncation, const IndexArg& x_t,
           uintptr_t coefs, uintptr_t x_prev, const StridedOut& log_probs, uintptr_t seed,
           uintptr_t status, uintptr_t stream) {
          const MrPosteriorParams p = posterior_params(batch, K, tokens, logp, uncond, guidance,
                                                       truncation, x_t, coefs, x_prev,
                                                       log_probs, seed);
          py::gil_scoped_release release;
          mr_posterior_cuda(p, ptr<int>(status), ptr<void>(stream));
        },
        IMGTX_POSTERIOR_ARGS, py::arg("status"), py::arg("stream"));

  m.def("mr_q_sample_cpu",
        [](int64_t batch, int64_t K, int64_t tokens, const IndexArg& x0, uintptr_t coefs,
           uintptr_t seed, uintptr_t x_t, int num_threads) {
          const MrQSampleParams p = q_sample_params(batch, K, tokens, x0, coefs, seed, x_t);
          py::gil_scoped_release release;
          return mr_q_sample_cpu(p, num_threads);
        },
        py::arg("batch"), py::arg("num_classes"), py::arg("tokens"), py::arg("x0"),
        py::arg("coefs"), py::arg("seed"), py::arg("x_t"), py::arg("num_threads"));
  m.def("mr_q_sample_cuda",
        [](int64_t batch, int64_t K, int64_t tokens, const IndexArg& x0, uintptr_t coefs,
           uintptr_t seed, uintptr_t x_t, uintptr_t status, uintptr_t stream) {
          const MrQSampleParams p = q_sample_params(batch, K, tokens, x0, coefs, seed, x_t);
          py::gil_scoped_release release;
          mr_q_sample_cuda(p, ptr<int>(status), ptr<void>(stream));
        },
        py::arg("batch"), py::arg("num_classes"), py::arg("tokens"), py::arg("x0"),
        py::arg("coefs"), py::arg("seed"), py::arg("x_t"), py::arg("status"), py::arg("stream"));

  m.def("mr_vb_forward_cpu",
        [](int64_t batch, int64_t K, int64_t tokens, const LogitsArg& logits, const IndexArg& x0,
           const IndexArg& x_t, uintptr_t coefs, uintptr_t saved, uintptr_t loss_vb,
           uintptr_t loss_aux, int num_threads) {
          MrVbParams p = vb_params(batch, K, tokens, logits, x0, x_t, coefs, saved);
          p.loss_vb = ptr<float>(loss_vb);
          p.loss_aux = ptr<float>(loss_aux);
          py::gil_scoped_release release;
          return mr_vb_forward_cpu(p, num_threads);
        },
        IMGTX_VB_ARGS, py::arg("loss_vb"), py::arg("loss_aux"), py::arg("num_threads"));
  m.def("mr_vb_forward_cuda",
        [](int64_t batch, int64_t K, int64_t tokens, const LogitsArg& logits, const IndexArg& x0,
           const IndexArg& x_t, uintptr_t coefs, uintptr_t saved, uintptr_t loss_vb,
           uintptr_t loss_aux, uintptr_t status, uintptr_t stream) {
          MrVbParams p = vb_params(batch, K, tokens, logits, x0, x_t, coefs, saved);
          p.loss_vb = ptr<float>(loss_vb);
          p.loss_aux = ptr<float>(loss_aux);
          py::gil_scoped_release release;
          mr_vb_forward_cuda(p, ptr<int>(status), ptr<void>(stream));
        },
        IMGTX_VB_ARGS, py::arg("loss_vb"), py::arg("loss_aux"), py::arg("status"),
        py::arg("stream"));

  m.def("mr_vb_backward_cpu",
        [](int64_t batch, int64_t K, int64_t tokens, const LogitsArg& logits, const IndexArg& x0,
           const IndexArg& x_t, uintptr_t coefs, uintptr_t saved, uintptr_t grad_vb,
           uintptr_t grad_aux, const StridedOut& grad, int num_threads) {
          MrVbParams p = vb_params(batch, K, tokens, logits, x0, x_t, coefs, saved);
          set_backward(&p, grad_vb, grad_aux, grad);
          py::gil_scoped_release release;
          mr_vb_backward_cpu(p, num_threads);
        },
        IMGTX_VB_ARGS, py::arg("grad_vb"), py::arg("grad_aux"), py::arg("grad_logits"),
        py::arg("num_threads"));
  m.def("mr_vb_backward_cuda",
        [](int64_t batch, int64_t K, int64_t tokens, const LogitsArg& logits, const IndexArg& x0,
           const IndexArg& x_t, uintptr_t coefs, uintptr_t saved, uintptr_t grad_vb,
           uintptr_t grad_aux, const StridedOut& grad, uintptr_t stream) {
          MrVbParams p = vb_params(batch, K, tokens, logits, x0, x_t, coefs, saved);
          set_backward(&p, grad_vb, grad_aux, grad);
          py::gil_scoped_release release;
          mr_vb_backward_cuda(p, ptr<void>(stream));
        },
        IMGTX_VB_ARGS, py::arg("grad_vb"), py::arg("grad_aux"), py::arg("grad_logits"),
        py::arg("stream"));
}

}  // namespace bindings
}  // namespace imgtx
