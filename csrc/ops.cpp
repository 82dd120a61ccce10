// Every fusedcnn op schema, once. Implementations are registered per device in
// csrc/<family>/<family>_cpu.cpp and <family>_cuda.cu; autograd and fake
// (meta) kernels are registered from Python (python/fusedcnn/ops/).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedcnn, m) {
  // ---- activation: x (any shape) float32|float64|float16|bfloat16
  m.def("relu(Tensor x) -> Tensor");
  m.def("relu_backward(Tensor grad_out, Tensor out) -> Tensor");

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
}

// An importable module with no Python functions: importing fusedcnn._C runs
// the static registrations above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
