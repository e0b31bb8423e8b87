// K independent LSTM layers (ensemble members: same shape, own weights, own inputs) run as one
// operation on the CPU, forward and backward.
//
// Every (member, slice of the batch) pair is an independent recurrence, so the work is cut into
// K x chunks tasks that at::parallel_for spreads over the threads with no synchronisation inside
// the time loop. Each time step is one recurrent product (small_mm, in vector registers) and one
// fused pass over the gates (the input projection folded into it). The backward pass keeps every
// step's gate gradients and forms the weight gradients after the loop as one large BLAS product
// per member and gate (over all steps and rows at once).
//
// Layout: time-major. x (K, T, B, I); h and c (K, T+1, B, H), index 0 the zero initial state;
// gates (K, T, B, 4H) after their activations, in PyTorch's order i, f, g, o. Weights are
// nn.LSTM's own tensors, one per member: w_ih (4H, I), w_hh (4H, H), b_ih and b_hh (4H).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

// The BLAS's own sgemm (MKL in PyTorch's x86 wheels, which export it): column-major, no
// tensors made per call. Called inside a parallel region, MKL runs it on the calling thread.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
namespace {

// column-major C (m, n) = alpha op(A) op(B) + beta C
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  sgemm_(ta ? "T" : "N", tb ? "T" : "N", &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

// C (rows, k) = A (rows, n) @ W for a weight W (n, k), all row-major, through the BLAS
inline void mm_nn(int64_t rows, int64_t n, int64_t k, const float* a, int64_t lda, const float* w, float* c,
                  int64_t ldc) {
  gemm(false, false, k, rows, n, 1.0f, w, k, a, lda, 0.0f, c, ldc);  // column-major: C^T = W^T A^T
}

// A (rows, k) @ B (k, n) for the recurrent products of one time step: a few rows, a weight that
// stays in cache. Written out in vector registers (GCC's vector extensions, compiled for this CPU)
// rather than sent to the BLAS, whose call repacks the weight every time: rows in blocks of R,
// columns in blocks of V vectors of 16, every block's sums kept in registers along k.
typedef float vec16 __attribute__((vector_size(64), may_alias, aligned(4)));

template <int R, int V>
inline void block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kd, float* c, int64_t ldc,
                  bool accumulate) {
  vec16 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? *reinterpret_cast<const vec16*>(c + r * ldc + 16 * v) : vec16{};
  for (int64_t k = 0; k < kd; ++k) {
    vec16 w[V];
    for (int v = 0; v < V; ++v) w[v] = *reinterpret_cast<const vec16*>(b + k * ldb + 16 * v);
    for (int r = 0; r < R; ++r) {
      const float s = a[r * lda + k];
      for (int v = 0; v < V; ++v) acc[r][v] += s * w[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) *reinterpret_cast<vec16*>(c + r * ldc + 16 * v) = acc[r][v];
}

template <int R>
inline void row_block(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t kd, int64_t n, float* c,
                      int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) block<R, 4>(a, lda, b + j, ldb, kd, c + j, ldc, accumulate);
  for (; j < n; j += 16) block<R, 1>(a, lda, b + j, ldb, kd, c + j, ldc, accumulate);
}

// C (rows, n) (+)= A (rows, kd) @ B (kd, n), all row-major; n a multiple of 16
inline void small_mm(int64_t rows, int64_t n, int64_t kd, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc, bool accumulate) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) row_block<4>(a + r * lda, lda, b, ldb, kd, n, c + r * ldc, ldc, accumulate);
  for (; r < rows; ++r) row_block<1>(a + r * lda, lda, b, ldb, kd, n, c + r * ldc, ldc, accumulate);
}

inline float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

struct Shape {
  int64_t K, T, B, I, H, chunks, rows;
};

Shape shape_of(const at::Tensor& x, at::TensorList w_hh) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "grouped lstm: x must be a float32 CPU tensor (K, T, B, I)");
  Shape s{x.size(0), x.size(1), x.size(2), x.size(3), w_hh[0].size(1), 1, x.size(2)};
  TORCH_CHECK(static_cast<int64_t>(w_hh.size()) == s.K, "grouped lstm: one weight per member");
  TORCH_CHECK(s.H % 16 == 0, "grouped lstm: the hidden size must be a multiple of 16");
  // enough tasks for every thread, no slice under 8 rows: K=3 on 2 threads is 6 tasks, 3 each
  int64_t threads = at::get_num_threads();
  s.chunks = std::max<int64_t>(1, std::min<int64_t>((threads + s.K - 1) / s.K * 2, s.B / 8));
  s.rows = (s.B + s.chunks - 1) / s.chunks;
  return s;
}

std::vector<at::Tensor> contiguous(at::TensorList ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "grouped lstm: float32 CPU weights");
    out.push_back(t.contiguous());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_forward(const at::Tensor& x_, at::TensorList w_ih_,
                                                            at::TensorList w_hh_, at::TensorList b_ih_,
                                                            at::TensorList b_hh_) {
  const Shape s = shape_of(x_, w_hh_);
  const auto x = x_.contiguous();
  const int64_t K = s.K, T = s.T, B = s.B, I = s.I, H = s.H, G = 4 * H;
  auto w_ih = contiguous(w_ih_), w_hh = contiguous(w_hh_), b_ih = contiguous(b_ih_), b_hh = contiguous(b_hh_);
  auto h = at::empty({K, T + 1, B, H}, x.options());
  auto c = at::empty({K, T + 1, B, H}, x.options());
  h.select(1, 0).zero_();
  c.select(1, 0).zero_();
  auto gates = at::empty({K, T, B, G}, x.options());
  std::vector<at::Tensor> w_in, w_rec, bias;  // W_ih^T (I, 4H) and W_hh^T (H, 4H); b_ih + b_hh
  for (int64_t k = 0; k < K; ++k) {
    w_in.push_back(w_ih[k].t().contiguous());
    w_rec.push_back(w_hh[k].t().contiguous());
    bias.push_back(b_ih[k] + b_hh[k]);
  }
  const float* xp = x.data_ptr<float>();
  float *hp = h.data_ptr<float>(), *cp = c.data_ptr<float>(), *gp = gates.data_ptr<float>();

  at::parallel_for(0, K * s.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / s.chunks, r0 = (task % s.chunks) * s.rows, rows = std::min(s.rows, B - r0);
      if (rows <= 0) continue;
      const float *wi = w_in[k].data_ptr<float>(), *wh = w_rec[k].data_ptr<float>(), *bk = bias[k].data_ptr<float>();
      for (int64_t t = 0; t < T; ++t) {
        float* g = gp + ((k * T + t) * B + r0) * G;
        const float* xt = xp + ((k * T + t) * B + r0) * I;
        const float* h_prev = hp + ((k * (T + 1) + t) * B + r0) * H;
        const float* c_prev = cp + ((k * (T + 1) + t) * B + r0) * H;
        float* h_next = hp + ((k * (T + 1) + t + 1) * B + r0) * H;
        float* c_next = cp + ((k * (T + 1) + t + 1) * B + r0) * H;
        for (int64_t r = 0; r < rows; ++r) {  // bias + x_t W_ih^T: few inputs, so a loop, not a GEMM
          float* gr = g + r * G;
          std::copy(bk, bk + G, gr);
          for (int64_t i = 0; i < I; ++i) {
            const float xv = xt[r * I + i];
            const float* wr = wi + i * G;
#pragma omp simd
            for (int64_t j = 0; j < G; ++j) gr[j] += xv * wr[j];
          }
        }
        if (t > 0) small_mm(rows, G, H, h_prev, H, wh, G, g, G, true);  // += h_{t-1} W_hh^T (h_0 = 0)
        for (int64_t r = 0; r < rows; ++r) {
          float* gr = g + r * G;
          const float* cr = c_prev + r * H;
          float *hn = h_next + r * H, *cn = c_next + r * H;
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) {
            const float i = sigmoid(gr[j]), f = sigmoid(gr[H + j]), gg = std::tanh(gr[2 * H + j]),
                        o = sigmoid(gr[3 * H + j]);
            const float cv = f * cr[j] + i * gg;
            gr[j] = i, gr[H + j] = f, gr[2 * H + j] = gg, gr[3 * H + j] = o;
            cn[j] = cv;
            hn[j] = o * std::tanh(cv);
          }
        }
      }
    }
  });
  return {h, c, gates};
}

// grad_h (K, T, B, H): the loss's gradient with respect to each step's output h_1..h_T; or
// (K, B, H), with respect to the last one h_T alone (a forecaster reads no other).
// Returns dx (K, T, B, I) (empty unless need_dx), dw_ih (K, 4H, I), dw_hh (K, 4H, H), db (K, 4H),
// db being the gradient of b_ih and of b_hh alike.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_h_, const at::Tensor& x_, at::TensorList w_ih_, at::TensorList w_hh_,
    const at::Tensor& h, const at::Tensor& c, const at::Tensor& gates, bool need_dx) {
  const Shape s = shape_of(x_, w_hh_);
  const auto x = x_.contiguous();
  const int64_t K = s.K, T = s.T, B = s.B, I = s.I, H = s.H, G = 4 * H;
  auto w_ih = contiguous(w_ih_), w_hh = contiguous(w_hh_);
  const bool last_only = grad_h_.dim() == 3;
  auto grad_h = grad_h_.contiguous();
  auto dz = at::empty({K, T, B, G}, x.options());  // the gates' pre-activation gradients, every step
  // carried to the step before; for the last step alone, it starts as that step's gradient
  auto dh = last_only ? grad_h.clone() : at::zeros({K, B, H}, x.options());
  const std::vector<float> no_grad(H, 0.0f);
  auto dc = at::zeros({K, B, H}, x.options());
  const float *ghp = grad_h.data_ptr<float>(), *hp = h.data_ptr<float>(), *cp = c.data_ptr<float>(),
              *gp = gates.data_ptr<float>();
  float *dzp = dz.data_ptr<float>(), *dhp = dh.data_ptr<float>(), *dcp = dc.data_ptr<float>();

  at::parallel_for(0, K * s.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / s.chunks, r0 = (task % s.chunks) * s.rows, rows = std::min(s.rows, B - r0);
      if (rows <= 0) continue;
      const float* wh = w_hh[k].data_ptr<float>();
      float *dh_k = dhp + (k * B + r0) * H, *dc_k = dcp + (k * B + r0) * H;
      for (int64_t t = T - 1; t >= 0; --t) {
        const float* g = gp + ((k * T + t) * B + r0) * G;
        float* d = dzp + ((k * T + t) * B + r0) * G;
        const float* gh = last_only ? nullptr : ghp + ((k * T + t) * B + r0) * H;
        const float* c_now = cp + ((k * (T + 1) + t + 1) * B + r0) * H;
        const float* c_prev = cp + ((k * (T + 1) + t) * B + r0) * H;
        for (int64_t r = 0; r < rows; ++r) {
          const float *gr = g + r * G, *ghr = gh ? gh + r * H : no_grad.data(), *cr = c_now + r * H, *cpr = c_prev + r * H;
          float *dr = d + r * G, *dhr = dh_k + r * H, *dcr = dc_k + r * H;
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) {
            const float i = gr[j], f = gr[H + j], gg = gr[2 * H + j], o = gr[3 * H + j];
            const float dhv = ghr[j] + dhr[j], tc = std::tanh(cr[j]);
            const float dcv = dcr[j] + dhv * o * (1.0f - tc * tc);
            dr[j] = dcv * gg * i * (1.0f - i);
            dr[H + j] = dcv * cpr[j] * f * (1.0f - f);
            dr[2 * H + j] = dcv * i * (1.0f - gg * gg);
            dr[3 * H + j] = dhv * tc * o * (1.0f - o);
            dcr[j] = dcv * f;
          }
        }
        if (t > 0) small_mm(rows, H, G, d, G, wh, H, dh_k, H, false);  // dh_{t-1} = dz_t @ W_hh
      }
    }
  });

  // weight gradients: one reduction over every step and row of each member
  auto dw_ih = at::empty({K, G, I}, x.options()), dw_hh = at::empty({K, G, H}, x.options());
  auto db = dz.sum({1, 2});
  auto dx = need_dx ? at::empty({K, T, B, I}, x.options()) : at::Tensor();
  // tasks of (member, gate): K x 4 independent products, so the threads share them evenly
  float *dwh = dw_hh.data_ptr<float>(), *dwi = dw_ih.data_ptr<float>();
  const float* x_all = x.data_ptr<float>();
  at::parallel_for(0, K * 4, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / 4, q = task % 4;
      const float* d = dzp + k * T * B * G + q * H;  // (T*B, H) columns of gate q, row stride G
      float* dwh_q = dwh + (k * G + q * H) * H;
      if (T > 1) {  // over steps 1..T-1 only: h_0 = 0 adds nothing
        gemm(false, true, H, H, (T - 1) * B, 1.0f, hp + (k * (T + 1) + 1) * B * H, H, d + B * G, G, 0.0f, dwh_q, H);
      } else {
        std::fill(dwh_q, dwh_q + H * H, 0.0f);
      }
      gemm(false, true, I, H, T * B, 1.0f, x_all + k * T * B * I, I, d, G, 0.0f, dwi + (k * G + q * H) * I, I);
    }
  });
  if (need_dx) {
    at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        mm_nn(T * B, G, I, dzp + k * T * B * G, G, w_ih[k].data_ptr<float>(), dx.data_ptr<float>() + k * T * B * I, I);
    });
  }
  return {dx, dw_ih, dw_hh, db};
}

}  // namespace

TORCH_LIBRARY(rnnflow_grouped, m) {
  m.def("lstm_forward(Tensor x, Tensor[] w_ih, Tensor[] w_hh, Tensor[] b_ih, Tensor[] b_hh)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("lstm_backward(Tensor grad_h, Tensor x, Tensor[] w_ih, Tensor[] w_hh, Tensor h, Tensor c,"
        " Tensor gates, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnnflow_grouped, CPU, m) {
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
}
