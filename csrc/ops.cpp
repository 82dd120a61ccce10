// Every fusedcnn op schema, once. Implementations are registered per device in
// csrc/<family>/<family>_cpu.cpp and <family>_cuda.cu, the autograd of the differentiable ops
// (relu, the pools, conv2d, dropout, batch_norm_train_forward) in csrc/<family>/<family>_autograd.cpp
// (Autograd-key kernels, csrc/autograd.h); fake (meta) kernels are registered from Python
// (python/fusedcnn/ops/).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedcnn, m) {
  // ---- activation: x (any shape) float32|float64|float16|bfloat16
  m.def("relu(Tensor x) -> Tensor");
  m.def("relu_backward(Tensor grad_out, Tensor out) -> Tensor");

  // ---- batchnorm: x (N, C, H, W) float32|float16|bfloat16 (CPU also float64), NCHW or NHWC;
  // mean/var/invstd/sum_dy/sum_dy_xmu: (C,) float32 (float64 for float64 x); weight/bias: (C,) any float dtype.
  m.def("batch_norm_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("batch_norm_apply(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, bool relu) -> Tensor");
  m.def("batch_norm_backward_reduce(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor? bias, bool relu) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def("batch_norm_backward_elemt(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor? bias, Tensor? sum_dy, Tensor? sum_dy_xmu, float count, bool relu) -> Tensor");
  // Training forward / backward in one call each (no sync BN between the passes): the CPU kernels keep a
  // channel in cache between the passes; elsewhere the two-pass composition of the ops above. The forward also
  // updates the running statistics given (momentum; the variance unbiased), as aten::native_batch_norm does.
  m.def("batch_norm_train_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, float momentum, float eps, bool relu) -> "
        "(Tensor y, Tensor mean, Tensor var, Tensor invstd)");
  m.def("batch_norm_train_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor? bias, bool relu) -> (Tensor grad_x, Tensor sum_dy, Tensor sum_dy_xmu)");
  // ---- conv: x (N, C, H, W), weight (C_out, C/groups, kH, kW), bias (C_out,); csrc/conv/conv.h.
  // algo: "auto" | "im2col" (cpp) | "implicit_gemm" (triton only). Symmetric padding: Python pads
  // asymmetric "same" explicitly. conv2d_backward returns (grad_x, grad_weight, grad_bias), each an
  // empty (0,) tensor where output_mask is false.
  m.def("conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
        "int groups, str algo) -> Tensor");
  m.def("conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups, bool[3] output_mask, str algo) -> (Tensor, Tensor, Tensor)");
  // ---- pooling: x (N, C, H, W) float32|float16|bfloat16 (CPU: float32|float64|bfloat16), NCHW or NHWC.
  // Indices are flat h*W+w per plane, int64 (empty when not requested). Backward of max
  // recomputes the argmax from x; adaptive max reads its saved indices (csrc/pooling/).
  m.def("max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode, "
        "bool return_indices) -> (Tensor, Tensor)");
  m.def("max_pool2d_backward(Tensor grad_out, Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode) -> Tensor");
  m.def("avg_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
        "bool count_include_pad, int? divisor_override) -> Tensor");
  m.def("avg_pool2d_backward(Tensor grad_out, int[4] input_size, int[2] kernel_size, int[2] stride, int[2] padding, "
        "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
  m.def("adaptive_avg_pool2d(Tensor x, int[2] output_size) -> Tensor");
  m.def("adaptive_avg_pool2d_backward(Tensor grad_out, int[4] input_size) -> Tensor");
  m.def("adaptive_max_pool2d(Tensor x, int[2] output_size) -> (Tensor, Tensor)");
  m.def("adaptive_max_pool2d_backward(Tensor grad_out, Tensor indices, int[4] input_size) -> Tensor");
  // ---- dropout: x (any shape) float32|float64|float16|bfloat16, contiguous or channels_last.
  // out = x * (philox_u(seed, logical index) > p ? 1/(1-p) : 0); the backward is the same op on
  // grad_out with the forward's seed (the mask is regenerated, never stored).
  // seed: SymInt so torch.compile can pass the seed drawn inside the graph; the kernels take an int64.
  m.def("dropout(Tensor x, float p, SymInt seed) -> Tensor");
}

namespace fusedcnn {
extern PyMethodDef fast_call_methods[];  // csrc/fast_call.cpp
}

// Importing fusedcnn._C runs the static registrations above; its one Python function is _fast_op.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fusedcnn::fast_call_methods};
  return PyModule_Create(&module_def);
}
}
