// ReLU's autograd (csrc/autograd.h): grad_in = relu_backward(grad_out, out), out saved; double backward:
// aten::threshold_backward, differentiable in grad_out (the mask out > 0 is constant).
#include "autograd.h"

namespace fusedcnn {
namespace {

struct Relu : public torch::autograd::Function<Relu> {
  static const auto& op() {
    static const auto h = op_handle<at::Tensor(const at::Tensor&)>("fusedcnn::relu");
    return h;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    at::Tensor out = call_below_autograd(op(), x);
    ctx->save_for_backward({out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto relu_backward =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("fusedcnn::relu_backward");
    const at::Tensor out = ctx->get_saved_variables()[0];
    if (at::GradMode::is_enabled()) return {at::threshold_backward(grads[0], out, 0)};
    return {call_below_autograd(relu_backward, grads[0], out)};
  }
};

at::Tensor relu_autograd(const at::Tensor& x) {
  return records_grad(x) ? Relu::apply(x) : call_below_autograd(Relu::op(), x);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, Autograd, m) { m.impl("relu", &relu_autograd); }

}  // namespace fusedcnn
