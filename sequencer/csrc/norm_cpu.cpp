// The LayerNorm backward of a Sequencer block's pre-norm, with the residual's gradient added in the same pass
// (sequencer/layers/fused_mlp.py, norm_residual).
//
// Registered as torch.ops.sequencer_norm.layer_norm_backward_residual. In a block, x feeds both LN(x) and the
// residual sum, so its gradient is LN's backward plus the residual's gradient: autograd would add them in a
// separate pass over the whole activation. Per row, with xhat = (x - mean) rstd and gw = g * weight:
//   dx = rstd (gw - mean(gw) - xhat mean(gw xhat)) + g_res,
// and the weight and bias gradients are the column sums of g xhat and g (per-thread partial sums,
// deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

constexpr int64_t kLanes = 16;   // independent partial sums per row reduction, so that it vectorises

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "sequencer_norm: ", name, " must be a contiguous float32 CPU tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_residual(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const at::Tensor& g_res) {
  check(g, "g");
  check(x, "x");
  check(mean, "mean");
  check(rstd, "rstd");
  check(weight, "weight");
  check(g_res, "g_res");
  const int64_t C = weight.numel();
  TORCH_CHECK(C > 0 && x.numel() % C == 0 && g.sizes() == x.sizes() && g_res.sizes() == x.sizes() &&
              mean.numel() * C == x.numel() && rstd.numel() * C == x.numel(),
              "sequencer_norm.layer_norm_backward_residual: inconsistent shapes");
  const int64_t M = x.numel() / C;
  at::Tensor dx = at::empty_like(x);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M));
  at::Tensor partial = at::zeros({chunks, 2, C}, x.options());   // per chunk: sum g xhat, sum g
  const float* gp = g.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* mp = mean.data_ptr<float>();
  const float* rp = rstd.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* rgp = g_res.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const int64_t Cv = C - C % kLanes;
  const float inv_c = 1.0f / static_cast<float>(C);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      float* dw = pp + c * 2 * C;
      float* db = dw + C;
      for (int64_t i = c * M / chunks; i < (c + 1) * M / chunks; ++i) {
        const float* gr = gp + i * C;
        const float* xr = xp + i * C;
        const float mu = mp[i], rs = rp[i];
        float a1[kLanes] = {}, a2[kLanes] = {};
        for (int64_t j0 = 0; j0 < Cv; j0 += kLanes) {
          for (int64_t l = 0; l < kLanes; ++l) {
            const int64_t j = j0 + l;
            const float xh = (xr[j] - mu) * rs, gw = gr[j] * wp[j];
            a1[l] += gw;
            a2[l] += gw * xh;
            dw[j] += gr[j] * xh;
            db[j] += gr[j];
          }
        }
        float s1 = 0.0f, s2 = 0.0f;
        for (int64_t l = 0; l < kLanes; ++l) {
          s1 += a1[l];
          s2 += a2[l];
        }
        for (int64_t j = Cv; j < C; ++j) {
          const float xh = (xr[j] - mu) * rs, gw = gr[j] * wp[j];
          s1 += gw;
          s2 += gw * xh;
          dw[j] += gr[j] * xh;
          db[j] += gr[j];
        }
        const float m1 = s1 * inv_c, m2 = s2 * inv_c;
        const float* rr = rgp + i * C;
        float* out = dxp + i * C;
        for (int64_t j = 0; j < C; ++j) {
          const float xh = (xr[j] - mu) * rs;
          out[j] = rs * (gr[j] * wp[j] - m1 - xh * m2) + rr[j];
        }
      }
    }
  });
  at::Tensor sums = partial.sum(0);
  return {dx, sums[0], sums[1]};
}

}  // namespace

TORCH_LIBRARY(sequencer_norm, m) {
  m.def("layer_norm_backward_residual(Tensor g, Tensor x, Tensor mean, Tensor rstd, Tensor weight, "
        "Tensor g_res) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sequencer_norm, CPU, m) {
  m.impl("layer_norm_backward_residual", &layer_norm_backward_residual);
}
