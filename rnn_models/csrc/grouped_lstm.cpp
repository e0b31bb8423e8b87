// K independent LSTM layers (ensemble members: same shape, own weights, own inputs) run as one
// operation on the CPU, forward and backward; rnnflow_grouped::forecast (grouped_forecast.cpp)
// builds the members' forecasters on them and registers their backward for autograd.
//
// Every (member, slice of the batch) pair is an independent recurrence, so the work is cut into
// K x chunks tasks that at::parallel_for spreads over the threads with no synchronisation inside
// the time loop. Each time step is one recurrent product (small_mm, in vector registers) and one
// fused pass over the gates (the input projection folded into it). The backward pass keeps every
// step's gate gradients and forms the weight gradients after the loop as one large BLAS product
// per member and gate (over all steps and rows at once).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
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

// out (n) = the sums of the columns of A (rows, n), row stride lda: blocks of 64 rows summed, then
// the blocks' sums, so that the rounding error grows with the number of blocks, not of rows
inline void column_sums(const float* a, int64_t rows, int64_t n, int64_t lda, float* out) {
  std::fill(out, out + n, 0.0f);
  std::vector<float> block(n);
  for (int64_t r0 = 0; r0 < rows; r0 += 64) {
    std::fill(block.begin(), block.end(), 0.0f);
    for (int64_t r = r0; r < std::min(rows, r0 + 64); ++r) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) block[j] += a[r * lda + j];
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] += block[j];
  }
}

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

// One layer's tensors as the tasks read and write them (layout as in the header).
struct Tape {
  const float* x;
  float *h, *c, *tanh_c, *gates;
};

Tape tape_of(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c, const at::Tensor& tanh_c,
             const at::Tensor& gates) {
  return {x.data_ptr<float>(), h.data_ptr<float>(), c.data_ptr<float>(), tanh_c.data_ptr<float>(),
          gates.data_ptr<float>()};
}

// fn(member k, first row r0, rows) for each of the K x chunks tasks, spread over the threads
template <class Fn>
void for_each_task(const Shape& s, const Fn& fn) {
  at::parallel_for(0, s.K * s.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / s.chunks, r0 = (task % s.chunks) * s.rows, rows = std::min(s.rows, s.B - r0);
      if (rows > 0) fn(k, r0, rows);
    }
  });
}

// One time step's gate pass over `rows` rows: g holds the gates' pre-activations and becomes their
// activations; writes c_t, tanh(c_t) and h_t.
inline void gate_pass(int64_t rows, int64_t H, float* g, const float* c_prev, float* h_next, float* c_next,
                      float* tanh_next) {
  const int64_t G = 4 * H;
  for (int64_t r = 0; r < rows; ++r) {
    float* gr = g + r * G;
    const float* cr = c_prev + r * H;
    float *hn = h_next + r * H, *cn = c_next + r * H, *tn = tanh_next + r * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float i = sigmoid(gr[j]), f = sigmoid(gr[H + j]), gg = std::tanh(gr[2 * H + j]), o = sigmoid(gr[3 * H + j]);
      const float cv = f * cr[j] + i * gg;
      gr[j] = i, gr[H + j] = f, gr[2 * H + j] = gg, gr[3 * H + j] = o;
      const float tc = std::tanh(cv);
      cn[j] = cv, tn[j] = tc;
      hn[j] = o * tc;
    }
  }
}

// Member k's rows r0.. r0+rows of the batch through every step (one task of lstm_forward), with its
// W_ih^T (I, 4H), W_hh^T (H, 4H) and b_ih + b_hh.
void forward_rows(const Shape& s, const Tape& tape, int64_t k, int64_t r0, int64_t rows, const float* wi,
                  const float* wh, const float* bias) {
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, G = 4 * H;
  for (int64_t t = 0; t < T; ++t) {
    float* g = tape.gates + ((k * T + t) * B + r0) * G;
    const float* xt = tape.x + ((k * T + t) * B + r0) * I;
    const int64_t now = (k * (T + 1) + t) * B + r0, next = now + B;  // rows of h and c at t and t + 1
    for (int64_t r = 0; r < rows; ++r) {  // bias + x_t W_ih^T: few inputs, so a loop, not a GEMM
      float* gr = g + r * G;
      std::copy(bias, bias + G, gr);
      for (int64_t i = 0; i < I; ++i) {
        const float xv = xt[r * I + i];
        const float* wr = wi + i * G;
#pragma omp simd
        for (int64_t j = 0; j < G; ++j) gr[j] += xv * wr[j];
      }
    }
    if (t > 0) small_mm(rows, G, H, tape.h + now * H, H, wh, G, g, G, true);  // += h_{t-1} W_hh^T (h_0 = 0)
    gate_pass(rows, H, g, tape.c + now * H, tape.h + next * H, tape.c + next * H,
              tape.tanh_c + ((k * T + t) * B + r0) * H);
  }
}

// One time step's gate gradients over `rows` rows: d (rows, 4H) from the carried dh and dc and the
// step's own output gradient gh (rows gh_stride apart: 0 where a row of zeros stands for none);
// dc carried on to the step before.
inline void gate_gradients(int64_t rows, int64_t H, const float* g, const float* gh, int64_t gh_stride,
                           const float* tanh_now, const float* c_prev, float* d, const float* dh, float* dc) {
  const int64_t G = 4 * H;
  for (int64_t r = 0; r < rows; ++r) {
    const float *gr = g + r * G, *ghr = gh + r * gh_stride, *tr = tanh_now + r * H, *cpr = c_prev + r * H,
                *dhr = dh + r * H;
    float *dr = d + r * G, *dcr = dc + r * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float i = gr[j], f = gr[H + j], gg = gr[2 * H + j], o = gr[3 * H + j];
      const float dhv = ghr[j] + dhr[j], tc = tr[j];
      const float dcv = dcr[j] + dhv * o * (1.0f - tc * tc);
      dr[j] = dcv * gg * i * (1.0f - i);
      dr[H + j] = dcv * cpr[j] * f * (1.0f - f);
      dr[2 * H + j] = dcv * i * (1.0f - gg * gg);
      dr[3 * H + j] = dhv * tc * o * (1.0f - o);
      dcr[j] = dcv * f;
    }
  }
}

// Member k's rows r0.. r0+rows back through every step (one task of lstm_backward): the gates'
// pre-activation gradients dz, from dh (the last step's output gradient when grad_h is null).
void backward_rows(const Shape& s, const Tape& tape, const float* grad_h, int64_t k, int64_t r0, int64_t rows,
                   const float* wh, float* dz, float* dh, float* dc) {
  const int64_t T = s.T, B = s.B, H = s.H, G = 4 * H;
  const std::vector<float> none(H, 0.0f);
  float *dh_k = dh + (k * B + r0) * H, *dc_k = dc + (k * B + r0) * H;
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t step = (k * T + t) * B + r0;
    float* d = dz + step * G;
    gate_gradients(rows, H, tape.gates + step * G, grad_h ? grad_h + step * H : none.data(), grad_h ? H : 0,
                   tape.tanh_c + step * H, tape.c + ((k * (T + 1) + t) * B + r0) * H, d, dh_k, dc_k);
    if (t > 0) small_mm(rows, H, G, d, G, wh, H, dh_k, H, false);  // dh_{t-1} = dz_t @ W_hh
  }
}

// Member k's weight gradients for gate q from every step's dz (one task of lstm_backward): over
// all steps and rows at once, one BLAS product each; and the bias gradient, dz's column sums.
void weight_gradients(const Shape& s, const Tape& tape, const float* dz, int64_t k, int64_t q, float* dw_ih,
                      float* dw_hh, float* db) {
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, G = 4 * H;
  const float* d = dz + k * T * B * G + q * H;  // (T*B, H) columns of gate q, row stride G
  float* dwh_q = dw_hh + (k * G + q * H) * H;
  if (T > 1) {  // over steps 1..T-1 only: h_0 = 0 adds nothing
    gemm(false, true, H, H, (T - 1) * B, 1.0f, tape.h + (k * (T + 1) + 1) * B * H, H, d + B * G, G, 0.0f, dwh_q, H);
  } else {
    std::fill(dwh_q, dwh_q + H * H, 0.0f);
  }
  gemm(false, true, I, H, T * B, 1.0f, tape.x + k * T * B * I, I, d, G, 0.0f, dw_ih + (k * G + q * H) * I, I);
  column_sums(d, T * B, H, G, db + k * G + q * H);
}

// dx (K, T, B, I) = dz (K, T, B, 4H) @ W_ih, member by member
at::Tensor input_gradient(const at::Tensor& dz, const std::vector<at::Tensor>& w_ih, int64_t I) {
  const int64_t K = dz.size(0), rows = dz.size(1) * dz.size(2), G = dz.size(3);
  auto dx = at::empty({K, dz.size(1), dz.size(2), I}, dz.options());
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k)
      mm_nn(rows, G, I, dz.data_ptr<float>() + k * rows * G, G, w_ih[k].data_ptr<float>(),
            dx.data_ptr<float>() + k * rows * I, I);
  });
  return dx;
}

}  // namespace

namespace grouped_lstm {

// (Declared in grouped_forecast.cpp.) tanh(c) is kept rather than computed again in the backward pass: the same values, once.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(const at::Tensor& x_, at::TensorList w_ih_,
                                                                        at::TensorList w_hh_, at::TensorList b_ih_,
                                                                        at::TensorList b_hh_) {
  const Shape s = shape_of(x_, w_hh_);
  const auto x = x_.contiguous();
  const int64_t K = s.K, T = s.T, B = s.B, H = s.H, G = 4 * H;
  auto w_ih = contiguous(w_ih_), w_hh = contiguous(w_hh_), b_ih = contiguous(b_ih_), b_hh = contiguous(b_hh_);
  auto h = at::empty({K, T + 1, B, H}, x.options()), c = at::empty({K, T + 1, B, H}, x.options());
  h.select(1, 0).zero_();
  c.select(1, 0).zero_();
  auto gates = at::empty({K, T, B, G}, x.options()), tanh_c = at::empty({K, T, B, H}, x.options());
  std::vector<at::Tensor> w_in, w_rec, bias;  // W_ih^T (I, 4H) and W_hh^T (H, 4H); b_ih + b_hh
  for (int64_t k = 0; k < K; ++k) {
    w_in.push_back(w_ih[k].t().contiguous());
    w_rec.push_back(w_hh[k].t().contiguous());
    bias.push_back(b_ih[k] + b_hh[k]);
  }
  const Tape tape = tape_of(x, h, c, tanh_c, gates);
  for_each_task(s, [&](int64_t k, int64_t r0, int64_t rows) {
    forward_rows(s, tape, k, r0, rows, w_in[k].data_ptr<float>(), w_rec[k].data_ptr<float>(),
                 bias[k].data_ptr<float>());
  });
  return {h, c, tanh_c, gates};
}

// (Declared in grouped_forecast.cpp.) A forecaster reads the last step's output alone: grad_h (K, B, H).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const at::Tensor& grad_h_, const at::Tensor& x_, at::TensorList w_ih_, at::TensorList w_hh_,
    const at::Tensor& h, const at::Tensor& c, const at::Tensor& tanh_c, const at::Tensor& gates, bool need_dx) {
  const Shape s = shape_of(x_, w_hh_);
  const auto x = x_.contiguous();
  const int64_t K = s.K, T = s.T, B = s.B, I = s.I, H = s.H, G = 4 * H;
  auto w_ih = contiguous(w_ih_), w_hh = contiguous(w_hh_);
  const bool last_only = grad_h_.dim() == 3;
  auto grad_h = grad_h_.contiguous();
  auto dz = at::empty({K, T, B, G}, x.options());  // the gates' pre-activation gradients, every step
  // carried to the step before; for the last step alone, it starts as that step's gradient
  auto dh = last_only ? grad_h.clone() : at::zeros({K, B, H}, x.options());
  auto dc = at::zeros({K, B, H}, x.options());
  const Tape tape = tape_of(x, h, c, tanh_c, gates);
  for_each_task(s, [&](int64_t k, int64_t r0, int64_t rows) {
    backward_rows(s, tape, last_only ? nullptr : grad_h.data_ptr<float>(), k, r0, rows, w_hh[k].data_ptr<float>(),
                  dz.data_ptr<float>(), dh.data_ptr<float>(), dc.data_ptr<float>());
  });
  auto dw_ih = at::empty({K, G, I}, x.options()), dw_hh = at::empty({K, G, H}, x.options()),
       db = at::empty({K, G}, x.options());
  // tasks of (member, gate): K x 4 independent products, so the threads share them evenly
  at::parallel_for(0, K * 4, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task)
      weight_gradients(s, tape, dz.data_ptr<float>(), task / 4, task % 4, dw_ih.data_ptr<float>(),
                       dw_hh.data_ptr<float>(), db.data_ptr<float>());
  });
  return {need_dx ? input_gradient(dz, w_ih, I) : at::Tensor(), dw_ih, dw_hh, db};
}

}  // namespace grouped_lstm
