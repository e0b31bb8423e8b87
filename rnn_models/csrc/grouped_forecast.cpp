// rnnflow_grouped::forecast: K LSTM forecasters of one shape (a model's members) as one PyTorch
// operator on the CPU, its backward registered for autograd, so that autograd, the public
// optimizers and rnn_models.training's loop run it as any other (rnn_models/grouped.py).

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

// The grouped LSTM layer, defined in grouped_lstm.cpp (compiled with this file).
// Layout: time-major. x (K, T, B, I); h and c (K, T+1, B, H), index 0 the zero initial state;
// tanh(c) (K, T, B, H) of steps 1..T; gates (K, T, B, 4H) after their activations, in PyTorch's
// order i, f, g, o. Weights are nn.LSTM's own tensors, one per member: w_ih (4H, I), w_hh (4H, H),
// b_ih and b_hh (4H). All float32 on the CPU.
namespace grouped_lstm {

// Returns h, c, tanh(c) and the gates: what lstm_backward reads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(const at::Tensor& x, at::TensorList w_ih,
                                                                        at::TensorList w_hh, at::TensorList b_ih,
                                                                        at::TensorList b_hh);

// grad_h (K, T, B, H), the gradient of every step's output h_1..h_T, or (K, B, H), of the last
// one's alone. Returns dx (K, T, B, I) (undefined unless need_dx), dw_ih (K, 4H, I),
// dw_hh (K, 4H, H) and db (K, 4H), the gradient of b_ih and of b_hh alike.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(const at::Tensor& grad_h, const at::Tensor& x,
                                                                         at::TensorList w_ih, at::TensorList w_hh,
                                                                         const at::Tensor& h, const at::Tensor& c,
                                                                         const at::Tensor& tanh_c,
                                                                         const at::Tensor& gates, bool need_dx);

}  // namespace grouped_lstm

namespace {

using grouped_lstm::lstm_backward;
using grouped_lstm::lstm_forward;

// The forecaster around the layers: K members' stacked LSTM layers and linear heads as one
// operator, with its backward registered for autograd (GroupedForecast below), so that autograd
// sees one node for the whole network. x (K, B, T, I), member k's sequences in x[k]; lstm: for
// each layer, the K members' w_ih, then their w_hh, b_ih and b_hh; head_w (O, H) and head_b (O),
// one per member. Returns the heads' outputs (K, B, O). With `tape`, it keeps what the backward
// pass reads: for each layer its input, h, c, tanh(c) and gates, then the last step's h and the
// stacked head weights.
at::Tensor forecast_forward(const at::Tensor& x, at::TensorList lstm, at::TensorList head_w, at::TensorList head_b,
                            std::vector<at::Tensor>* tape) {
  const int64_t K = head_w.size(), layers = lstm.size() / (4 * K);
  TORCH_CHECK(K > 0 && layers > 0 && static_cast<int64_t>(lstm.size()) == 4 * K * layers,
              "grouped forecast: 4 LSTM tensors per member and layer, one head per member");
  auto seq = x.transpose(1, 2).contiguous();  // time-major (K, T, B, I)
  at::Tensor h;
  for (int64_t l = 0; l < layers; ++l) {
    const auto w = lstm.slice(4 * K * l, 4 * K);
    at::Tensor c, tanh_c, gates;
    std::tie(h, c, tanh_c, gates) = lstm_forward(seq, w.slice(0, K), w.slice(K, K), w.slice(2 * K, K),
                                                 w.slice(3 * K, K));
    if (tape) tape->insert(tape->end(), {seq, h, c, tanh_c, gates});
    seq = h.slice(1, 1);  // every step's output (K, T, B, H): the next layer's input
  }
  const auto last = h.select(1, -1);  // (K, B, H)
  const auto w_out = at::stack(head_w);  // (K, O, H)
  auto out = at::baddbmm(at::stack(head_b).unsqueeze(1), last, w_out.transpose(1, 2));  // (K, B, O)
  if (tape) tape->insert(tape->end(), {last, w_out});
  return out;
}

// The gradients of forecast_forward's inputs from its output's (K, B, O), in its inputs' order:
// x's (undefined: the windows are data), then one per LSTM tensor and head tensor of every member.
torch::autograd::variable_list forecast_backward(const at::Tensor& grad_out, const std::vector<at::Tensor>& saved,
                                                 int64_t K) {
  // saved: the tape (5 a layer, then 2), then the LSTM weights (4K a layer)
  const int64_t layers = (static_cast<int64_t>(saved.size()) - 2) / (5 + 4 * K);
  const at::TensorList weights(saved.data() + 5 * layers + 2, 4 * K * layers);
  const auto grad = grad_out.contiguous();
  const auto& last = saved[5 * layers];
  const auto& w_out = saved[5 * layers + 1];
  torch::autograd::variable_list grads(1 + 4 * K * layers + 2 * K);
  const auto head_w = at::bmm(grad.transpose(1, 2), last);  // (K, O, H)
  const auto head_b = grad.sum(1);  // (K, O)
  auto dh = at::bmm(grad, w_out);  // the last step's dL/dh (K, B, H)
  for (int64_t l = layers - 1; l >= 0; --l) {
    const auto w = weights.slice(4 * K * l, 4 * K);
    const auto* tape = &saved[5 * l];  // the layer's input, h, c, tanh(c), gates
    auto [dx, dw_ih, dw_hh, db] = lstm_backward(dh, tape[0], w.slice(0, K), w.slice(K, K), tape[1], tape[2], tape[3],
                                                tape[4], l > 0);
    const auto db_hh = db.clone();  // b_ih's and b_hh's gradients alike, each its own (clipping scales both)
    for (int64_t k = 0; k < K; ++k) {
      auto* into = &grads[1 + 4 * K * l];
      into[k] = dw_ih[k], into[K + k] = dw_hh[k], into[2 * K + k] = db[k], into[3 * K + k] = db_hh[k];
    }
    dh = dx;
  }
  for (int64_t k = 0; k < K; ++k) {
    grads[1 + 4 * K * layers + k] = head_w[k];
    grads[1 + 4 * K * layers + K + k] = head_b[k];
  }
  return grads;
}

struct GroupedForecast : public torch::autograd::Function<GroupedForecast> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, at::TensorList lstm,
                            at::TensorList head_w, at::TensorList head_b) {
    at::AutoDispatchBelowADInplaceOrView guard;
    TORCH_CHECK(!x.requires_grad(), "grouped forecast: no gradient for the windows");
    std::vector<at::Tensor> saved;
    auto out = forecast_forward(x, lstm, head_w, head_b, &saved);
    saved.insert(saved.end(), lstm.begin(), lstm.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["members"] = static_cast<int64_t>(head_w.size());
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    return forecast_backward(grad_outputs[0], ctx->get_saved_variables(), ctx->saved_data["members"].toInt());
  }
};

at::Tensor forecast(const at::Tensor& x, at::TensorList lstm, at::TensorList head_w, at::TensorList head_b) {
  return forecast_forward(x, lstm, head_w, head_b, nullptr);
}

at::Tensor forecast_autograd(const at::Tensor& x, at::TensorList lstm, at::TensorList head_w,
                             at::TensorList head_b) {
  return GroupedForecast::apply(x, lstm, head_w, head_b);
}

}  // namespace

TORCH_LIBRARY(rnnflow_grouped, m) {
  m.def("forecast(Tensor x, Tensor[] lstm, Tensor[] head_weight, Tensor[] head_bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnflow_grouped, CPU, m) { m.impl("forecast", &forecast); }

TORCH_LIBRARY_IMPL(rnnflow_grouped, Autograd, m) { m.impl("forecast", &forecast_autograd); }
