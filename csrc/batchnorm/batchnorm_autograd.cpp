// The autograd of BatchNorm's one-call training forward (csrc/autograd.h; the cpp backend's training path
// without sync, python/fusedcnn/ops/batchnorm.py):
//   batch_norm_train_forward(x, weight?, bias?, running_mean?, running_var?, momentum, eps, relu)
//       -> (y, mean, var, invstd)          running_mean / running_var updated in place (not differentiable)
// y is differentiable in x, weight and bias (through the batch statistics); mean, var, invstd are not (their
// gradient flows through y). x, weight, bias, mean, invstd saved. Backward: batch_norm_train_backward when dx is
// needed, else batch_norm_backward_reduce; dweight = sum_dy_xmu * invstd, dbias = sum_dy. Double backward:
// differentiable ATen ops, the statistics recomputed from x (ops/batchnorm.py _differentiable_grads).
#include "autograd.h"

namespace fusedcnn {
namespace {

using OptTensor = std::optional<at::Tensor>;

// (dx, dweight, dbias) from differentiable ATen ops (the double backward), training mode, one process.
// grad_out, x: (N, C, H, W); mean, invstd: the forward's (C,) statistics in the compute dtype (constant: only the
// ReLU mask reads them, from the forward's own values).
variable_list differentiable_grads(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& bias, const at::Tensor& fwd_mean, const at::Tensor& fwd_invstd,
                                   double eps, bool relu, std::array<bool, 3> needs) {
  const at::ScalarType acc = fwd_mean.scalar_type();
  const std::vector<int64_t> c{1, -1, 1, 1};
  const at::Tensor w = weight.defined() ? weight.to(acc).view(c) : at::Tensor();
  at::Tensor g = grad_out.to(acc);
  const at::Tensor xf = x.to(acc);
  if (relu) {
    at::Tensor z;
    {
      at::NoGradGuard no_grad;
      z = (xf - fwd_mean.view(c)) * fwd_invstd.view(c);
      if (w.defined()) z = z * w;
      if (bias.defined()) z = z + bias.to(acc).view(c);
    }
    g = g * z.gt(0);
  }
  // The batch statistics as functions of x (reference.batch_norm_stats): mean, biased variance over N, H, W.
  const double count = static_cast<double>(x.numel() / std::max<int64_t>(x.size(1), 1));
  const at::Tensor mean = xf.sum({0, 2, 3}) / count;
  const at::Tensor xmu = xf - mean.view(c);
  const at::Tensor invstd = at::rsqrt(xmu.pow(2).sum({0, 2, 3}) / count + eps);
  const at::Tensor sum_dy = g.sum({0, 2, 3}), sum_dy_xmu = (g * xmu).sum({0, 2, 3});
  variable_list grads(3);
  if (needs[0]) {
    const at::Tensor scale = w.defined() ? invstd * w.view(-1) : invstd;
    const at::Tensor dx = g - (sum_dy / count).view(c) - xmu * (invstd * invstd * sum_dy_xmu / count).view(c);
    grads[0] = (dx * scale.view(c)).to(x.scalar_type());
  }
  if (needs[1]) grads[1] = (sum_dy_xmu * invstd).to(weight.scalar_type());
  if (needs[2]) grads[2] = sum_dy.to(bias.scalar_type());
  return grads;
}

struct BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
  static const auto& op() {
    static const auto h = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, double,
        bool)>("fusedcnn::batch_norm_train_forward");
    return h;
  }

  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
                               double momentum, double eps, bool relu) {
    auto [y, mean, var, invstd] =
        call_below_autograd(op(), x, weight, bias, running_mean, running_var, momentum, eps, relu);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, invstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->mark_non_differentiable({mean, var, invstd});
    ctx->set_materialize_grads(false);  // no zeros for the three statistics' (undefined) gradients: ~3 us a call
    return {y, mean, var, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto train_backward = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
        const OptTensor&, bool)>("fusedcnn::batch_norm_train_backward");
    static const auto backward_reduce = op_handle<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
        const OptTensor&, bool)>("fusedcnn::batch_norm_backward_reduce");
    variable_list result(8);
    if (!grads[0].defined()) return result;  // y unused: no gradient
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &invstd = saved[4];
    const bool relu = ctx->saved_data["relu"].toBool();
    // Edges: x, then weight and bias where given.
    const size_t weight_edge = 1, bias_edge = weight.defined() ? 2 : 1;
    const std::array<bool, 3> needs{ctx->needs_input_grad(0), weight.defined() && ctx->needs_input_grad(weight_edge),
                                    bias.defined() && ctx->needs_input_grad(bias_edge)};
    if (at::GradMode::is_enabled()) {
      variable_list g = differentiable_grads(grads[0], x, weight, bias, mean, invstd,
                                             ctx->saved_data["eps"].toDouble(), relu, needs);
      std::move(g.begin(), g.end(), result.begin());
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView below;  // the kernels, and (C,)-vector arithmetic without autograd
    const OptTensor w = weight.defined() ? OptTensor(weight) : std::nullopt;
    const OptTensor b = bias.defined() ? OptTensor(bias) : std::nullopt;
    at::Tensor sum_dy, sum_dy_xmu;
    if (needs[0]) {
      std::tie(result[0], sum_dy, sum_dy_xmu) = train_backward.call(grads[0], x, mean, invstd, w, b, relu);
    } else if (needs[1] || needs[2]) {
      std::tie(sum_dy, sum_dy_xmu) = backward_reduce.call(grads[0], x, mean, invstd, w, b, relu);
    }
    if (needs[1]) result[1] = (sum_dy_xmu * invstd).to(weight.scalar_type());
    if (needs[2]) result[2] = sum_dy.to(bias.scalar_type());
    return result;
  }
};

// The in-place update of a running statistic, as autograd sees in-place ops: its version counter moves (a graph
// that saved it then refuses to use the stale value).
void bump_version(const OptTensor& t) {
  if (t.has_value() && t->defined()) t->unsafeGetTensorImpl()->bump_version();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_train_forward_autograd(
    const at::Tensor& x, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
    const OptTensor& running_var, double momentum, double eps, bool relu) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  if (!records_grad(x, weight, bias)) {
    out = call_below_autograd(BatchNormTrain::op(), x, weight, bias, running_mean, running_var, momentum, eps, relu);
  } else {
    auto res = BatchNormTrain::apply(x, weight, bias, running_mean, running_var, momentum, eps, relu);
    out = {res[0], res[1], res[2], res[3]};
  }
  bump_version(running_mean);
  bump_version(running_var);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, Autograd, m) { m.impl("batch_norm_train_forward", &batch_norm_train_forward_autograd); }

}  // namespace fusedcnn
