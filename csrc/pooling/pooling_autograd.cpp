// Pooling's autograd (csrc/autograd.h). x: (N, C, H, W). Backward ops (csrc/ops.cpp):
//   max:           max_pool2d_backward(grad_out, x, ...)       x saved; the argmax is recomputed from it
//   avg, adaptive avg: *_backward(grad_out, input_size, ...)   only x's shape saved
//   adaptive max:  adaptive_max_pool2d_backward(grad_out, indices, input_size)   the output indices saved
// Double backward: aten's pooling backward ops, each linear (so differentiable) in grad_out; they take the input
// for its shape only where just the shape is saved: an uninitialized tensor.
#include "autograd.h"

namespace fusedcnn {
namespace {

using Ints = std::vector<int64_t>;

// kernel, stride, padding (, dilation) as one int vector in ctx->saved_data["geometry"]; pair i of it.
Ints concat(std::initializer_list<at::IntArrayRef> pairs) {
  Ints all;
  for (at::IntArrayRef p : pairs) all.insert(all.end(), p.begin(), p.end());
  return all;
}
at::IntArrayRef pair(const Ints& all, size_t i) { return at::IntArrayRef(all).slice(2 * i, 2); }

// x's shape, saved symbolic (a trace with dynamic shapes) and specialized only when a backward op takes it.
void save_input_size(AutogradContext* ctx, const at::Tensor& x) { ctx->saved_data["input_size"] = x.sym_sizes(); }
c10::DimVector input_size(AutogradContext* ctx) {
  return C10_AS_INTARRAYREF_SLOW_ALLOC(ctx->saved_data["input_size"].toSymIntVector());
}
at::Tensor input_like(AutogradContext* ctx, const at::Tensor& grad_out) {  // double backward: the shape only
  return at::empty(input_size(ctx), grad_out.options().memory_format(dense_format(grad_out)));
}

struct MaxPool2d : public torch::autograd::Function<MaxPool2d> {
  static const auto& op() {
    static const auto h = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, bool)>(
        "fusedcnn::max_pool2d");
    return h;
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s,
                               at::IntArrayRef p, at::IntArrayRef d, bool ceil_mode, bool return_indices) {
    auto [out, indices] = call_below_autograd(op(), x, k, s, p, d, ceil_mode, return_indices);
    ctx->set_materialize_grads(false);  // no zeros for the indices' (always undefined) gradient: ~1 us a call
    ctx->save_for_backward({x});
    ctx->saved_data["geometry"] = concat({k, s, p, d});
    ctx->saved_data["ceil_mode"] = ceil_mode;
    return {out, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto pool_backward = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                                           at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool)>(
        "fusedcnn::max_pool2d_backward");
    if (!grads[0].defined()) return {{}, {}, {}, {}, {}, {}, {}};  // the output unused: no gradient
    const at::Tensor x = ctx->get_saved_variables()[0];
    const Ints g = ctx->saved_data["geometry"].toIntVector();
    const bool ceil_mode = ctx->saved_data["ceil_mode"].toBool();
    const auto k = pair(g, 0), s = pair(g, 1), p = pair(g, 2), d = pair(g, 3);
    at::Tensor grad_in;
    if (at::GradMode::is_enabled()) {
      // The argmax as the kernels pick it (first maximum in scan order, NaN wins): torch's forward's.
      const at::Tensor indices = std::get<1>(at::max_pool2d_with_indices(x.detach(), k, s, p, d, ceil_mode));
      grad_in = at::max_pool2d_with_indices_backward(grads[0], x, k, s, p, d, ceil_mode, indices);
    } else {
      grad_in = call_below_autograd(pool_backward, grads[0], x, k, s, p, d, ceil_mode);
    }
    return {grad_in, {}, {}, {}, {}, {}, {}};
  }
};

struct AvgPool2d : public torch::autograd::Function<AvgPool2d> {
  static const auto& op() {
    static const auto h = op_handle<at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                               bool, bool, std::optional<int64_t>)>("fusedcnn::avg_pool2d");
    return h;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s,
                            at::IntArrayRef p, bool ceil_mode, bool count_include_pad,
                            std::optional<int64_t> divisor_override) {
    at::Tensor out = call_below_autograd(op(), x, k, s, p, ceil_mode, count_include_pad, divisor_override);
    save_input_size(ctx, x);
    ctx->saved_data["geometry"] = concat({k, s, p});
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["count_include_pad"] = count_include_pad;
    ctx->saved_data["divisor_override"] = divisor_override;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto pool_backward =
        op_handle<at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                             bool, bool, std::optional<int64_t>)>("fusedcnn::avg_pool2d_backward");
    const Ints g = ctx->saved_data["geometry"].toIntVector();
    const bool ceil_mode = ctx->saved_data["ceil_mode"].toBool();
    const bool count_include_pad = ctx->saved_data["count_include_pad"].toBool();
    const std::optional<int64_t> divisor = ctx->saved_data["divisor_override"].toOptional<int64_t>();
    const auto k = pair(g, 0), s = pair(g, 1), p = pair(g, 2);
    at::Tensor grad_in;
    if (at::GradMode::is_enabled()) {
      grad_in = at::avg_pool2d_backward(grads[0], input_like(ctx, grads[0]), k, s, p, ceil_mode, count_include_pad,
                                        divisor);
    } else {
      grad_in = call_below_autograd(pool_backward, grads[0], input_size(ctx), k, s, p, ceil_mode, count_include_pad,
                                    divisor);
    }
    return {grad_in, {}, {}, {}, {}, {}, {}};
  }
};

struct AdaptiveAvgPool2d : public torch::autograd::Function<AdaptiveAvgPool2d> {
  static const auto& op() {
    static const auto h = op_handle<at::Tensor(const at::Tensor&, at::IntArrayRef)>("fusedcnn::adaptive_avg_pool2d");
    return h;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef output_size) {
    at::Tensor out = call_below_autograd(op(), x, output_size);
    save_input_size(ctx, x);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto pool_backward =
        op_handle<at::Tensor(const at::Tensor&, at::IntArrayRef)>("fusedcnn::adaptive_avg_pool2d_backward");
    if (at::GradMode::is_enabled()) return {at::_adaptive_avg_pool2d_backward(grads[0], input_like(ctx, grads[0])), {}};
    return {call_below_autograd(pool_backward, grads[0], input_size(ctx)), {}};
  }
};

struct AdaptiveMaxPool2d : public torch::autograd::Function<AdaptiveMaxPool2d> {
  static const auto& op() {
    static const auto h = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, at::IntArrayRef)>(
        "fusedcnn::adaptive_max_pool2d");
    return h;
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::IntArrayRef output_size) {
    auto [out, indices] = call_below_autograd(op(), x, output_size);
    ctx->set_materialize_grads(false);  // as MaxPool2d
    ctx->save_for_backward({indices});
    save_input_size(ctx, x);
    return {out, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto pool_backward =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef)>(
            "fusedcnn::adaptive_max_pool2d_backward");
    if (!grads[0].defined()) return {{}, {}};
    const at::Tensor indices = ctx->get_saved_variables()[0];
    if (at::GradMode::is_enabled()) {
      return {at::adaptive_max_pool2d_backward(grads[0], input_like(ctx, grads[0]), indices), {}};
    }
    return {call_below_autograd(pool_backward, grads[0], indices, input_size(ctx)), {}};
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool2d_autograd(const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s,
                                                       at::IntArrayRef p, at::IntArrayRef d, bool ceil_mode,
                                                       bool return_indices) {
  if (!records_grad(x)) return call_below_autograd(MaxPool2d::op(), x, k, s, p, d, ceil_mode, return_indices);
  auto res = MaxPool2d::apply(x, k, s, p, d, ceil_mode, return_indices);
  return {res[0], res[1]};
}

at::Tensor avg_pool2d_autograd(const at::Tensor& x, at::IntArrayRef k, at::IntArrayRef s, at::IntArrayRef p,
                               bool ceil_mode, bool count_include_pad, std::optional<int64_t> divisor_override) {
  if (!records_grad(x)) {
    return call_below_autograd(AvgPool2d::op(), x, k, s, p, ceil_mode, count_include_pad, divisor_override);
  }
  return AvgPool2d::apply(x, k, s, p, ceil_mode, count_include_pad, divisor_override);
}

at::Tensor adaptive_avg_pool2d_autograd(const at::Tensor& x, at::IntArrayRef output_size) {
  if (!records_grad(x)) return call_below_autograd(AdaptiveAvgPool2d::op(), x, output_size);
  return AdaptiveAvgPool2d::apply(x, output_size);
}

std::tuple<at::Tensor, at::Tensor> adaptive_max_pool2d_autograd(const at::Tensor& x, at::IntArrayRef output_size) {
  if (!records_grad(x)) return call_below_autograd(AdaptiveMaxPool2d::op(), x, output_size);
  auto res = AdaptiveMaxPool2d::apply(x, output_size);
  return {res[0], res[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, Autograd, m) {
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("avg_pool2d", &avg_pool2d_autograd);
  m.impl("adaptive_avg_pool2d", &adaptive_avg_pool2d_autograd);
  m.impl("adaptive_max_pool2d", &adaptive_max_pool2d_autograd);
}

}  // namespace fusedcnn
