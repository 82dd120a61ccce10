// Every fusedcnn op schema, once. Implementations are registered per device in
// csrc/<family>/<family>_cpu.cpp and <family>_cuda.cu; autograd and fake
// (meta) kernels are registered from Python (python/fusedcnn/ops/).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedcnn, m) {
  // ---- activation: x (any shape) float32|float64|float16|bfloat16
  m.def("relu(Tensor x) -> Tensor");
  m.def("relu_backward(Tensor grad_out, Tensor out) -> Tensor");

  // ---- dropout: x (any shape) float32|float64|float16|bfloat16, contiguous or channels_last.
  // out = x * (philox_u(seed, logical index) > p ? 1/(1-p) : 0); the backward is the same op on
  // grad_out with the forward's seed (the mask is regenerated, never stored).
  // seed: SymInt so torch.compile can pass the seed drawn inside the graph; the kernels take an int64.
  m.def("dropout(Tensor x, float p, SymInt seed) -> Tensor");
}

// An importable module with no Python functions: importing fusedcnn._C runs
// the static registrations above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
