// Every fusedcnn op schema, once. Implementations are registered per device in
// csrc/<family>/<family>_cpu.cpp and <family>_cuda.cu; autograd and fake
// (meta) kernels are registered from Python (python/fusedcnn/ops/).
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
}

// An importable module with no Python functions: importing fusedcnn._C runs
// the static registrations above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
