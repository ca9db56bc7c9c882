// A Sequencer block's pre-norm with its residual (sequencer/layers/fused_mlp.py, norm_residual).
//
// torch.ops.sequencer_norm.layer_norm_residual_bias: the forward, LN(x) and x + b in one pass over x, where b
// is the bias of the branch's last linear layer (whose GEMM then accumulates onto x + b).
//
// torch.ops.sequencer_norm.layer_norm_backward_residual: the backward. In a block, x feeds both LN(x) and the
// residual sum, so its gradient is LN's backward plus the residual's gradient: autograd would add them in a
// separate pass over the whole activation. Per row, with xhat = (x - mean) rstd and gw = g * weight:
//   dx = rstd (gw - mean(gw) - xhat mean(gw xhat)) + g_res,
// and the weight and bias gradients are the column sums of g xhat and g (per-thread partial sums,
// deterministic); with res_sum, also those of g_res: the gradient of a bias added to the residual
// (layer_norm_residual_bias below), summed while g_res is read anyway.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;   // independent partial sums per row reduction, so that it vectorises

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(),
              "sequencer_norm: ", name, " must be a contiguous float32 CPU tensor");
}

// LayerNorm over the last dimension (size C = weight's) and, in the same pass over x, r = x + r_bias: the
// residual of a block with the bias of the branch's last linear layer already added, which that layer's GEMM
// then accumulates onto. Returns (LN(x), mean, rstd, r); mean and rstd as native_layer_norm's (biased
// variance, two passes over each row while it is in L1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_residual_bias(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps, const at::Tensor& r_bias) {
  check(x, "x");
  check(weight, "weight");
  check(bias, "bias");
  check(r_bias, "r_bias");
  const int64_t C = weight.numel();
  TORCH_CHECK(C > 0 && x.dim() >= 1 && x.size(-1) == C && bias.numel() == C && r_bias.numel() == C,
              "sequencer_norm.layer_norm_residual_bias: inconsistent shapes");
  const int64_t M = x.numel() / C;
  at::Tensor y = at::empty_like(x);
  at::Tensor r = at::empty_like(x);
  std::vector<int64_t> stat_shape(x.sizes().begin(), x.sizes().end() - 1);
  stat_shape.push_back(1);
  at::Tensor mean = at::empty(stat_shape, x.options());
  at::Tensor rstd = at::empty(stat_shape, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const float* rbp = r_bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = r.data_ptr<float>();
  float* mp = mean.data_ptr<float>();
  float* sp = rstd.data_ptr<float>();
  const int64_t Cv = C - C % kLanes;
  const float inv_c = 1.0f / static_cast<float>(C);
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* xr = xp + i * C;
      float* rr = rp + i * C;
      float a[kLanes] = {};
      for (int64_t j0 = 0; j0 < Cv; j0 += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const float v = xr[j0 + l];
          a[l] += v;
          rr[j0 + l] = v + rbp[j0 + l];
        }
      }
      float s = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) s += a[l];
      for (int64_t j = Cv; j < C; ++j) {
        s += xr[j];
        rr[j] = xr[j] + rbp[j];
      }
      const float mu = s * inv_c;
      float q[kLanes] = {};
      for (int64_t j0 = 0; j0 < Cv; j0 += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const float d = xr[j0 + l] - mu;
          q[l] += d * d;
        }
      }
      float ss = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) ss += q[l];
      for (int64_t j = Cv; j < C; ++j) {
        const float d = xr[j] - mu;
        ss += d * d;
      }
      const float rs = 1.0f / std::sqrt(ss * inv_c + feps);
      mp[i] = mu;
      sp[i] = rs;
      float* yr = yp + i * C;
      for (int64_t j = 0; j < C; ++j) yr[j] = (xr[j] - mu) * rs * wp[j] + bp[j];
    }
  });
  return {y, mean, rstd, r};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_residual(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const at::Tensor& weight, const at::Tensor& g_res, bool res_sum) {
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
  const int64_t P = res_sum ? 3 : 2;
  at::Tensor partial = at::zeros({chunks, P, C}, x.options());   // per chunk: sum g xhat, sum g[, sum g_res]
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
      float* dw = pp + c * P * C;
      float* db = dw + C;
      float* dr = res_sum ? db + C : nullptr;
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
        if (res_sum) {
          for (int64_t j = 0; j < C; ++j) dr[j] += rr[j];
        }
      }
    }
  });
  at::Tensor sums = partial.sum(0);
  return {dx, sums[0], sums[1], res_sum ? sums[2] : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY(sequencer_norm, m) {
  m.def("layer_norm_backward_residual(Tensor g, Tensor x, Tensor mean, Tensor rstd, Tensor weight, "
        "Tensor g_res, bool res_sum=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_residual_bias(Tensor x, Tensor weight, Tensor bias, float eps, Tensor r_bias) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sequencer_norm, CPU, m) {
  m.impl("layer_norm_backward_residual", &layer_norm_backward_residual);
  m.impl("layer_norm_residual_bias", &layer_norm_residual_bias);
}
