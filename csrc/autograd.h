// Shared by the C++ autograd of the ops (csrc/<family>/<family>_autograd.cpp). Each differentiable op's
// Autograd-key kernel is a torch::autograd::Function: its forward calls the op below autograd and its backward
// the family's backward op, both through the dispatcher (so the CPU and CUDA kernels, and the fake kernels
// registered from Python for torch.compile, all serve). When the backward itself is recorded (grad mode on:
// backward(create_graph=True), double backward) it computes the same gradients with differentiable ATen ops
// instead: the kernels have no autograd, so their result would be a constant and the second derivative wrong.
// The Python autograd (python/fusedcnn/ops/_registry.py `register`) is then not registered for these cpp ops.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include "common.h"

namespace fusedcnn {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed dispatcher handle of op `name` ("fusedcnn::relu"); keep it in a function-local static (the schema is
// registered by csrc/ops.cpp at load time, so look it up on first use, not during static initialization).
template <class Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Whether a call records autograd history: grad mode on and a tensor argument requiring grad. When it does not,
// an Autograd kernel calls its op below autograd directly (call_below_autograd): the result is the same, without
// Function::apply's graph node and saved state (~2 us a call).
inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && requires_grad(*t); }
template <class... Tensors>
bool records_grad(const Tensors&... tensors) {
  return at::GradMode::is_enabled() && (requires_grad(tensors) || ...);
}

template <class Signature, class... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Signature>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

}  // namespace fusedcnn
