// The CPU kernels of the fused MLP (sequencer/layers/fused_mlp.py): fc1's bias and the exact GELU in one
// pass over fc1's output, and in the backward the GELU's gradient and fc1's bias gradient in one pass.
//
// Registered as torch.ops.sequencer_mlp.bias_gelu_ / .gelu_grad_bias_. The forward also writes the
// GELU's derivative at each element, so that the backward is one multiplication instead of evaluating
// erf and exp again (the pre-activation itself is not needed by anything else and is overwritten).
//
// GELU(v) = v Phi(v), GELU'(v) = Phi(v) + v phi(v), Phi(v) = (1 + erf(v / sqrt 2)) / 2. erf uses
// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), whose exp(-x^2) term is phi's as well.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "cpu_math.h"

namespace {

using sequencer_cpu::exp_approx;

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "sequencer_mlp: ", name, " must be a contiguous float32 CPU tensor");
}

// h (M, K) <- GELU(h + bias); deriv (M, K) <- GELU'(h + bias) unless deriv is empty (inference)
void bias_gelu_(at::Tensor h, const at::Tensor& bias, at::Tensor deriv) {
  check(h, "h");
  check(bias, "bias");
  check(deriv, "deriv");
  TORCH_CHECK(h.dim() == 2 && bias.dim() == 1 && bias.size(0) == h.size(1) &&
              (deriv.numel() == 0 || deriv.sizes() == h.sizes()), "sequencer_mlp.bias_gelu_: inconsistent shapes");
  const int64_t M = h.size(0), K = h.size(1);
  const bool grad = deriv.numel() > 0;
  float* hp = h.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* dp = grad ? deriv.data_ptr<float>() : nullptr;
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* hr = hp + i * K;
      float* dr = grad ? dp + i * K : nullptr;
      for (int64_t j = 0; j < K; ++j) {
        const float v = hr[j] + bp[j];
        const float x = v * 0.70710678118654752f;
        const float t = 1.0f / (1.0f + 0.3275911f * std::fabs(x));
        const float e = exp_approx(-x * x);
        const float p = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
                         0.254829592f) * t;
        const float erf_abs = 1.0f - p * e;
        const float cdf = 0.5f + 0.5f * (x < 0.0f ? -erf_abs : erf_abs);
        hr[j] = v * cdf;
        if (grad) dr[j] = cdf + v * e * 0.39894228040143268f;   // phi(v) = exp(-v^2 / 2) / sqrt(2 pi)
      }
    }
  });
}

// g (M, K) <- g * deriv; returns the column sums of the result (fc1's bias gradient)
at::Tensor gelu_grad_bias_(at::Tensor g, const at::Tensor& deriv) {
  check(g, "g");
  check(deriv, "deriv");
  TORCH_CHECK(g.dim() == 2 && deriv.sizes() == g.sizes(), "sequencer_mlp.gelu_grad_bias_: inconsistent shapes");
  const int64_t M = g.size(0), K = g.size(1);
  // rows split into one chunk per thread, each with its own row of column sums (deterministic)
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M));
  at::Tensor partial = at::zeros({chunks, K}, g.options());
  float* gp = g.data_ptr<float>();
  const float* dp = deriv.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      float* acc = pp + c * K;
      for (int64_t i = c * M / chunks; i < (c + 1) * M / chunks; ++i) {
        float* gr = gp + i * K;
        const float* dr = dp + i * K;
        for (int64_t j = 0; j < K; ++j) {
          const float v = gr[j] * dr[j];
          gr[j] = v;
          acc[j] += v;
        }
      }
    }
  });
  return partial.sum(0);
}

}  // namespace

TORCH_LIBRARY(sequencer_mlp, m) {
  m.def("bias_gelu_(Tensor(a!) h, Tensor bias, Tensor(b!) deriv) -> ()");
  m.def("gelu_grad_bias_(Tensor(a!) g, Tensor deriv) -> Tensor");
}

TORCH_LIBRARY_IMPL(sequencer_mlp, CPU, m) {
  m.impl("bias_gelu_", &bias_gelu_);
  m.impl("gelu_grad_bias_", &gelu_grad_bias_);
}
