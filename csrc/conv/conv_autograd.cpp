// Conv2d's autograd (csrc/autograd.h): x and weight saved; conv2d_backward(grad_out, x, weight, ..., output_mask)
// computes the grads needed (an empty (0,) tensor for the others). Double backward: aten::convolution_backward,
// differentiable in grad_out, x and weight.
#include "autograd.h"

namespace fusedcnn {
namespace {

using Ints = std::vector<int64_t>;

struct Conv2d : public torch::autograd::Function<Conv2d> {
  static const auto& op() {
    static const auto h =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                             at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view)>("fusedcnn::conv2d");
    return h;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, c10::string_view algo) {
    at::Tensor y = call_below_autograd(op(), x, weight, bias, stride, padding, dilation, groups, algo);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["geometry"] = Ints{stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups};
    ctx->saved_data["algo"] = std::string(algo);
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto conv_backward = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
        int64_t, std::array<bool, 3>, c10::string_view)>("fusedcnn::conv2d_backward");
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // Edges: x, weight, then bias when given.
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    variable_list result(8);
    if (!(mask[0] || mask[1] || mask[2])) return result;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const Ints g = ctx->saved_data["geometry"].toIntVector();
    const at::IntArrayRef stride(g.data(), 2), padding(g.data() + 2, 2), dilation(g.data() + 4, 2);
    const int64_t groups = g[6];
    std::tuple<at::Tensor, at::Tensor, at::Tensor> dx_dw_db;
    if (at::GradMode::is_enabled()) {
      const std::vector<c10::SymInt> bias_sizes{weight.sym_size(0)};
      dx_dw_db = at::convolution_backward_symint(
          grads[0], x, weight, has_bias ? at::OptionalSymIntArrayRef(bias_sizes) : std::nullopt,
          c10::fromIntArrayRefSlow(stride), c10::fromIntArrayRefSlow(padding), c10::fromIntArrayRefSlow(dilation),
          false, {c10::SymInt(0), c10::SymInt(0)}, groups, mask);
    } else {
      // Dense grad_out in the output's layout (a no-op when autograd hands it so already).
      dx_dw_db = call_below_autograd(conv_backward, grads[0].contiguous(dense_format(x)), x, weight, stride, padding,
                                     dilation, groups, mask, ctx->saved_data["algo"].toStringRef());
    }
    auto& [dx, dw, db] = dx_dw_db;
    if (mask[0]) result[0] = dx;
    if (mask[1]) result[1] = dw;
    if (mask[2]) result[2] = db;
    return result;
  }
};

at::Tensor conv2d_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           c10::string_view algo) {
  if (!records_grad(x, weight, bias)) {
    return call_below_autograd(Conv2d::op(), x, weight, bias, stride, padding, dilation, groups, algo);
  }
  return Conv2d::apply(x, weight, bias, stride, padding, dilation, groups, algo);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedcnn, Autograd, m) { m.impl("conv2d", &conv2d_autograd); }

}  // namespace fusedcnn
