// Dropout's autograd (csrc/autograd.h): the backward is the same op on grad_out with the forward's p and seed
// (the mask is regenerated, never stored). Double backward: grad_out * mask, mask = the op on ones (kept: the
// scale 1/(1-p), dropped: 0) in the compute dtype, as the reference's dropout computes it; linear in grad_out.
#include "autograd.h"

namespace fusedcnn {
namespace {

struct Dropout : public torch::autograd::Function<Dropout> {
  // seed: SymInt in the schema (torch.compile passes one drawn inside the graph); the kernels take an int64.
  static const auto& op() {
    static const auto h = op_handle<at::Tensor(const at::Tensor&, double, c10::SymInt)>("fusedcnn::dropout");
    return h;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p, c10::SymInt seed) {
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    return call_below_autograd(op(), x, p, std::move(seed));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const double p = ctx->saved_data["p"].toDouble();
    c10::SymInt seed = ctx->saved_data["seed"].toSymInt();
    const at::Tensor& grad_out = grads[0];
    if (at::GradMode::is_enabled()) {
      const at::ScalarType acc = accumulation_dtype(grad_out.scalar_type());
      const at::Tensor mask =
          call_below_autograd(op(), at::ones_symint(grad_out.sym_sizes(), grad_out.options().dtype(acc)), p,
                              std::move(seed));
      return {(grad_out.to(acc) * mask).to(grad_out.scalar_type()), {}, {}};
    }
    return {call_below_autograd(op(), grad_out, p, std::move(seed)), {}, {}};
  }
};

at::Tensor dropout_autograd(const at::Tensor& x, double p, c10::SymInt seed) {
  if (!records_grad(x)) return call_below_autograd(Dropout::op(), x, p, std::move(seed));
  return Dropout::apply(x, p, std::move(seed));
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, Autograd, m) { m.impl("dropout", &dropout_autograd); }

}  // namespace fusedcnn
