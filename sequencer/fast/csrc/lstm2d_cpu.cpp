// The CPU recurrence of the fused BiLSTM2D engine (sequencer/layers/fused_lstm.py).
//
// Registered as torch.ops.sequencer_lstm2d.forward / .backward. Both run every step of every direction
// (vertical / horizontal x forward / backward) of one BiLSTM2D in a single call:
//
//  * the input projections xp (B*H*W, D*4h) come in token order, computed by one GEMM outside;
//  * each step multiplies the hidden states of all directions by W_hh (one batched GEMM, or one GEMM
//    per direction when the directions differ in length), then applies the LSTM cell in one fused,
//    vectorised pass that reads its input gates and writes its output straight at the token's position
//    (index arithmetic: no gathers, flips, permutes or concatenation);
//  * the backward runs the (dh, dc) recursion the same way and writes the gate gradients in token order,
//    so that the input gradient and dW_ih are single large GEMMs outside; dW_hh accumulates one batched
//    GEMM per step inside, and the bias gradient is summed inside too.
//
// Gates follow nn.LSTM's order (i, f, g, o). Saved for the backward: the gate activations, written in place
// over the input projections (each token's gates of one direction are read once, at one step, then
// replaced by their activations: no second buffer of that size), and the cell states in step order
// (T, D, N, h). The backward replaces the activations by the gate gradients in place in the same way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using sequencer_cpu::exp_approx;

SEQUENCER_INLINE float sigmoid_f(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
SEQUENCER_INLINE float tanh_f(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

struct Dir {
  bool vertical, reverse;
  int64_t T, N;  // steps per sequence, number of sequences
};

struct Grid {
  int64_t B, H, W, D, h;
  std::vector<Dir> dirs;
  int64_t T, N;  // the largest over the directions
  bool uniform;  // all directions have the same T and N (one batched GEMM per step)

  Grid(int64_t B_, int64_t H_, int64_t W_, at::IntArrayRef kinds, int64_t hidden)
      : B(B_), H(H_), W(W_), D(static_cast<int64_t>(kinds.size())), h(hidden), T(0), N(0), uniform(true) {
    for (int64_t k : kinds) {
      Dir d;
      d.vertical = (k & 2) != 0;
      d.reverse = (k & 1) != 0;
      d.T = d.vertical ? H : W;
      d.N = d.vertical ? B * W : B * H;
      if (!dirs.empty() && (d.T != dirs[0].T || d.N != dirs[0].N)) uniform = false;
      T = std::max(T, d.T);
      N = std::max(N, d.N);
      dirs.push_back(d);
    }
  }

  // the token (row of xp / y) that step t of sequence n of direction d reads and writes
  inline int64_t token(const Dir& d, int64_t t, int64_t n) const {
    int64_t s = d.reverse ? d.T - 1 - t : t;
    if (d.vertical) {
      int64_t b = n / W, k = n - b * W;
      return (b * H + s) * W + k;
    }
    int64_t b = n / H, k = n - b * H;
    return (b * H + k) * W + s;
  }
};

// One cell's backward: the gate gradients dg (4h: i, f, g, o) from dh, tanh(c) (tc), the activations act
// (4h) and c_{t-1}; dc (the cell-state gradient from step t + 1, zero at the last step) becomes dc_{t-1}.
// Separate pointers and no conditional loads, so that the loop vectorises.
SEQUENCER_INLINE void cell_backward(int64_t h, const float* SEQUENCER_RESTRICT dh,
                                    const float* SEQUENCER_RESTRICT tc, const float* SEQUENCER_RESTRICT act,
                                    const float* SEQUENCER_RESTRICT c_prev, float* SEQUENCER_RESTRICT dc,
                                    float* SEQUENCER_RESTRICT dg) {
  const float* ig = act;
  const float* fg = act + h;
  const float* gg = act + 2 * h;
  const float* og = act + 3 * h;
  for (int64_t j = 0; j < h; ++j) {
    const float dcj = dh[j] * og[j] * (1.0f - tc[j] * tc[j]) + dc[j];
    const float i = ig[j], f = fg[j], gv = gg[j], o = og[j];
    dg[j] = dcj * gv * i * (1.0f - i);
    dg[h + j] = dcj * c_prev[j] * f * (1.0f - f);
    dg[2 * h + j] = dcj * i * (1.0f - gv * gv);
    dg[3 * h + j] = dh[j] * tc[j] * o * (1.0f - o);
    dc[j] = dcj * f;
  }
}

// Prefetch `count` floats from p (the rows read at token positions are far apart in memory: the hardware
// prefetcher does not follow them).
inline void prefetch_floats(const float* p, int64_t count, bool write) {
  for (int64_t k = 0; k < count; k += 16) {
    if (write) __builtin_prefetch(p + k, 1, 3); else __builtin_prefetch(p + k, 0, 3);
  }
}

constexpr int64_t kPrefetchRows = 1;  // how many rows ahead to prefetch

// the token of the row kPrefetchRows after `row` at step t (or -1)
inline int64_t next_token(const Grid& g, int64_t row, int64_t end, int64_t t, int64_t N) {
  const int64_t r = row + kPrefetchRows;
  if (r >= end) return -1;
  const int64_t d = r / N, n = r - d * N;
  const Dir& dir = g.dirs[d];
  if (t >= dir.T || n >= dir.N) return -1;
  return g.token(dir, t, n);
}

void check_inputs(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              "sequencer_lstm2d: ", name, " must be a contiguous float32 CPU tensor of ", dim, " dimensions");
}

// rec[d] (N_d, out) = src[d] (N_d, in) @ w[d] (in, out) for the directions active at step t
void recurrent_mm(const Grid& g, int64_t t, bool backward, const at::Tensor& src, const at::Tensor& w,
                  at::Tensor& rec) {
  if (g.uniform) {
    at::bmm_out(rec, src, w);
    return;
  }
  for (int64_t d = 0; d < g.D; ++d) {
    const Dir& dir = g.dirs[d];
    bool active = backward ? (t < dir.T - 1) : (t >= 1 && t < dir.T);
    if (!active) continue;
    auto r = rec.select(0, d).narrow(0, 0, dir.N);
    at::mm_out(r, src.select(0, d).narrow(0, 0, dir.N), w.select(0, d));
  }
}

// A low-precision (bf16 / fp16) tensor of the same shape as `like`, contiguous, on the CPU; false when undefined.
bool check_low_precision(const c10::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (!t.has_value() || !t->defined()) return false;
  TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->sizes() == like.sizes() &&
                  (t->scalar_type() == at::kBFloat16 || t->scalar_type() == at::kHalf),
              "sequencer_lstm2d: ", name, " must be a contiguous bfloat16 or float16 CPU tensor shaped like ", name,
              "'s float32 counterpart");
  return true;
}

// dst[0:n] = src[0:n] as float (the low-precision type's own conversion)
template <typename LP>
SEQUENCER_INLINE void widen(const LP* SEQUENCER_RESTRICT src, float* SEQUENCER_RESTRICT dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

// dst[0:n] = src[0:n] rounded to the low-precision type (round to nearest even, as Tensor.to does)
template <typename LP>
SEQUENCER_INLINE void narrow_to(const float* SEQUENCER_RESTRICT src, LP* SEQUENCER_RESTRICT dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<LP>(src[j]);
}

// With save, xp's rows become the gate activations (in place) and the cell states are returned. With xin (the
// input projections in bf16 / fp16, as computed under autocast), the projections are read from xin instead of xp
// (and xp only receives the activations): no float32 copy of them is made first.
at::Tensor lstm2d_forward(at::Tensor xp, const at::Tensor& bias, const at::Tensor& whh_t, int64_t B, int64_t H,
                          int64_t W, at::IntArrayRef kinds, int64_t hidden, at::Tensor y, bool save,
                          const c10::optional<at::Tensor>& xin) {
  Grid g(B, H, W, kinds, hidden);
  const int64_t D = g.D, h = hidden, G = 4 * hidden, T = g.T, N = g.N;
  check_inputs(xp, "xp", 2);
  const bool low = check_low_precision(xin, xp, "xin");
  const bool half = low && xin->scalar_type() == at::kHalf;
  const at::BFloat16* xbf = low && !half ? xin->data_ptr<at::BFloat16>() : nullptr;
  const at::Half* xhf = half ? xin->data_ptr<at::Half>() : nullptr;
  check_inputs(bias, "bias", 1);
  check_inputs(whh_t, "whh_t", 3);
  check_inputs(y, "y", 2);
  TORCH_CHECK(xp.size(0) == B * H * W && xp.size(1) == D * G && bias.size(0) == D * G &&
              whh_t.size(0) == D && whh_t.size(1) == h && whh_t.size(2) == G && y.size(0) == B * H * W &&
              y.size(1) == D * h, "sequencer_lstm2d.forward: inconsistent shapes");
  auto opts = xp.options();
  at::Tensor cs = save ? at::empty({T, D, N, h}, opts) : at::empty({0}, opts);
  at::Tensor hs = at::zeros({D, N, h}, opts);   // hidden state of the current step
  at::Tensor cst = at::zeros({D, N, h}, opts);  // cell state (inference)
  at::Tensor rec = at::empty({D, N, G}, opts);  // h_{t-1} @ W_hh^T
  float* xpp = xp.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* hsp = hs.data_ptr<float>();
  float* cstp = cst.data_ptr<float>();
  const float* recp = rec.data_ptr<float>();
  float* cp = save ? cs.data_ptr<float>() : nullptr;
  const int64_t xs = D * G, ys = D * h;
  const int64_t grain = std::max<int64_t>(1, 2048 / G);

  for (int64_t t = 0; t < T; ++t) {
    if (t > 0) recurrent_mm(g, t, false, hs, whh_t, rec);
    at::parallel_for(0, D * N, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> a(G), wide(low ? G : 0);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t d = row / N, n = row - d * N;
        const Dir& dir = g.dirs[d];
        if (t >= dir.T || n >= dir.N) continue;
        const int64_t tok = g.token(dir, t, n);
        const int64_t nt = next_token(g, row, end, t, N);
        if (nt >= 0) {
          const int64_t nd = (row + kPrefetchRows) / N;
          if (!low || save) prefetch_floats(xpp + nt * xs + nd * G, G, save);
          if (low) {   // G 16-bit values: G / 2 floats' worth of bytes
            const void* lp = xbf != nullptr ? static_cast<const void*>(xbf + nt * xs + nd * G)
                                            : static_cast<const void*>(xhf + nt * xs + nd * G);
            prefetch_floats(static_cast<const float*>(lp), G / 2, false);
          }
          prefetch_floats(yp + nt * ys + nd * h, h, true);
        }
        float* xrow = xpp + tok * xs + d * G;
        const float* x = xrow;
        if (xbf != nullptr) {
          widen(xbf + tok * xs + d * G, wide.data(), G);
          x = wide.data();
        } else if (xhf != nullptr) {
          widen(xhf + tok * xs + d * G, wide.data(), G);
          x = wide.data();
        }
        const float* bb = bp + d * G;
        float* act = save ? xrow : a.data();   // in place: this token's gates are not read again
        if (t > 0) {
          const float* r = recp + row * G;
          for (int64_t j = 0; j < G; ++j) act[j] = x[j] + bb[j] + r[j];
        } else {
          for (int64_t j = 0; j < G; ++j) act[j] = x[j] + bb[j];
        }
        for (int64_t j = 0; j < 2 * h; ++j) act[j] = sigmoid_f(act[j]);
        for (int64_t j = 2 * h; j < 3 * h; ++j) act[j] = tanh_f(act[j]);
        for (int64_t j = 3 * h; j < G; ++j) act[j] = sigmoid_f(act[j]);
        const float* ig = act;
        const float* fg = act + h;
        const float* gg = act + 2 * h;
        const float* og = act + 3 * h;
        float* c = save ? cp + ((t * D + d) * N + n) * h : cstp + row * h;
        const float* c_prev = save ? (t > 0 ? cp + (((t - 1) * D + d) * N + n) * h : nullptr) : c;
        float* hn = hsp + row * h;
        float* out = yp + tok * ys + d * h;
        if (c_prev != nullptr && t > 0) {
          for (int64_t j = 0; j < h; ++j) c[j] = fg[j] * c_prev[j] + ig[j] * gg[j];
        } else {
          for (int64_t j = 0; j < h; ++j) c[j] = ig[j] * gg[j];
        }
        for (int64_t j = 0; j < h; ++j) {
          float v = og[j] * tanh_f(c[j]);
          hn[j] = v;
          out[j] = v;
        }
      }
    });
  }
  return cs;
}

// gates (B*H*W, D*4h): the activations saved by the forward, in token order, replaced in place by the gate
// gradients. Also computes the recurrent weight gradient dwhh (D, 4h, h) = sum_t dG_t^T h_{t-1}, one batched
// GEMM per step while that step's gate gradients are in cache, and the bias gradient db (D*4h) unless db is
// empty.
// With dxp (bf16 / fp16, shaped like gates), the gate gradients are written there, rounded, and gates is left as
// it is (the GEMMs that read them run in that dtype under autocast: no float32 copy to cast afterwards).
void lstm2d_backward(const at::Tensor& gy, at::Tensor gates, const at::Tensor& cs, const at::Tensor& whh,
                     const at::Tensor& y, int64_t B, int64_t H, int64_t W, at::IntArrayRef kinds, int64_t hidden,
                     at::Tensor dwhh, at::Tensor db, const c10::optional<at::Tensor>& dxp) {
  Grid g(B, H, W, kinds, hidden);
  const int64_t D = g.D, h = hidden, G = 4 * hidden, T = g.T, N = g.N;
  check_inputs(gy, "gy", 2);
  check_inputs(gates, "gates", 2);
  check_inputs(cs, "cs", 4);
  check_inputs(whh, "whh", 3);
  check_inputs(y, "y", 2);
  check_inputs(dwhh, "dwhh", 3);
  check_inputs(db, "db", 1);
  TORCH_CHECK(y.sizes() == gy.sizes() && dwhh.sizes() == whh.sizes(), "sequencer_lstm2d.backward: y / dwhh shapes");
  TORCH_CHECK(gy.size(0) == B * H * W && gy.size(1) == D * h && gates.size(0) == B * H * W &&
              gates.size(1) == D * G && cs.size(0) == T && cs.size(1) == D && cs.size(2) == N && cs.size(3) == h &&
              whh.size(0) == D && whh.size(1) == G && whh.size(2) == h,
              "sequencer_lstm2d.backward: inconsistent shapes");
  TORCH_CHECK(db.numel() == 0 || db.size(0) == D * 4 * hidden, "sequencer_lstm2d.backward: db shape");
  const bool low = check_low_precision(dxp, gates, "dxp");
  const bool half = low && dxp->scalar_type() == at::kHalf;
  at::BFloat16* dbf = low && !half ? dxp->data_ptr<at::BFloat16>() : nullptr;
  at::Half* dhf = half ? dxp->data_ptr<at::Half>() : nullptr;
  auto opts = gy.options();
  // the bias gradient (sum of the gate gradients over all tokens) accumulates while the gate gradients
  // are hot: rows split into one chunk per thread, each with its own partial sums (deterministic)
  const bool want_db = db.numel() > 0;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), D * g.N));
  at::Tensor partial = want_db ? at::zeros({chunks, D * 4 * hidden}, opts) : at::empty({0}, opts);
  float* partp = want_db ? partial.data_ptr<float>() : nullptr;
  at::Tensor dgs = at::zeros({D, N, G}, opts);  // gate gradients of step t + 1, for the recurrent GEMM
  at::Tensor dhr = at::zeros({D, N, h}, opts);  // dG_{t+1} @ W_hh
  at::Tensor dcs = at::zeros({D, N, h}, opts);  // dc carried to step t - 1
  const float* gyp = gy.data_ptr<float>();
  float* dxpp = gates.data_ptr<float>();   // activations in, gate gradients out
  const float* cp = cs.data_ptr<float>();
  float* dgsp = dgs.data_ptr<float>();
  const float* dhrp = dhr.data_ptr<float>();
  float* dcsp = dcs.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  at::Tensor hstep = at::empty({D, N, h}, opts);  // h_{t-1} of every sequence at step t, step order
  float* hsp = hstep.data_ptr<float>();
  dwhh.zero_();
  const int64_t xs = D * G, ys = D * h;

  for (int64_t t = T - 1; t >= 0; --t) {
    if (t < T - 1) recurrent_mm(g, t, true, dgs, whh, dhr);
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      std::vector<float> dh(h), tc(h), zero(h, 0.0f);
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t begin = chunk * D * N / chunks, end = (chunk + 1) * D * N / chunks;
        float* acc = want_db ? partp + chunk * D * G : nullptr;
        for (int64_t row = begin; row < end; ++row) {
          const int64_t d = row / N, n = row - d * N;
          const Dir& dir = g.dirs[d];
          if (t >= dir.T || n >= dir.N) continue;
          const bool last = (t == dir.T - 1);
          const int64_t tok = g.token(dir, t, n);
          const int64_t nt = next_token(g, row, end, t, N);
          if (nt >= 0) {
            const int64_t nd = (row + kPrefetchRows) / N;
            prefetch_floats(gyp + nt * ys + nd * h, h, false);
            prefetch_floats(dxpp + nt * xs + nd * G, G, true);   // the activations, then the gradients
            if (t > 0) {
              const int64_t nn = (row + kPrefetchRows) - nd * N;
              prefetch_floats(yp + g.token(g.dirs[nd], t - 1, nn) * ys + nd * h, h, false);
            }
          }
          const float* gyr = gyp + tok * ys + d * h;
          const float* r = dhrp + row * h;
          if (last) {
            for (int64_t j = 0; j < h; ++j) dh[j] = gyr[j];
          } else {
            for (int64_t j = 0; j < h; ++j) dh[j] = gyr[j] + r[j];
          }
          const float* act = dxpp + tok * xs + d * G;   // overwritten by the memcpy below, after the loop
          const float* c = cp + ((t * D + d) * N + n) * h;
          const float* c_prev = t > 0 ? cp + (((t - 1) * D + d) * N + n) * h : zero.data();   // c_{-1} = 0
          float* dc = dcsp + row * h;   // zero before a direction's last step (dcs starts as zeros)
          float* dgt = dgsp + row * G;
          for (int64_t j = 0; j < h; ++j) tc[j] = tanh_f(c[j]);
          cell_backward(h, dh.data(), tc.data(), act, c_prev, dc, dgt);
          if (dbf != nullptr) {
            narrow_to(dgt, dbf + tok * xs + d * G, G);
          } else if (dhf != nullptr) {
            narrow_to(dgt, dhf + tok * xs + d * G, G);
          } else {
            std::memcpy(dxpp + tok * xs + d * G, dgt, sizeof(float) * G);
          }
          if (want_db) {
            float* a = acc + d * G;
            for (int64_t j = 0; j < G; ++j) a[j] += dgt[j];
          }
          if (t > 0) std::memcpy(hsp + row * h, yp + g.token(dir, t - 1, n) * ys + d * h, sizeof(float) * h);
        }
      }
    });
    if (t > 0) {  // dW_hh += dG_t^T h_{t-1} (h_{-1} = 0)
      if (g.uniform) {
        dwhh.baddbmm_(dgs.transpose(1, 2), hstep);
      } else {
        for (int64_t d = 0; d < D; ++d) {
          const Dir& dir = g.dirs[d];
          if (t >= dir.T) continue;
          dwhh.select(0, d).addmm_(dgs.select(0, d).narrow(0, 0, dir.N).t(), hstep.select(0, d).narrow(0, 0, dir.N));
        }
      }
    }
  }
  if (want_db) db.copy_(partial.sum(0));
}

}  // namespace

TORCH_LIBRARY(sequencer_lstm2d, m) {
  m.def("forward(Tensor(a!) xp, Tensor bias, Tensor whh_t, int B, int H, int W, int[] kinds, int hidden, "
        "Tensor(b!) y, bool save, Tensor? xin=None) -> Tensor");
  m.def("backward(Tensor gy, Tensor(a!) gates, Tensor cs, Tensor whh, Tensor y, int B, int H, int W, int[] kinds, "
        "int hidden, Tensor(b!) dwhh, Tensor(c!) db, Tensor(d!)? dxp=None) -> ()");
}

TORCH_LIBRARY_IMPL(sequencer_lstm2d, CPU, m) {
  m.impl("forward", &lstm2d_forward);
  m.impl("backward", &lstm2d_backward);
}
