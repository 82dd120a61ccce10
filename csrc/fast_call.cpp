// fusedcnn._C._fast_op(name, overload): a Python callable that runs op `name` ("fusedcnn::relu") through the
// dispatcher, for eager calls from Python. torch.ops' own call (OpOverload.__call__) converts every argument
// by the generic Python-to-IValue path and checks each one for __torch_function__ overrides: ~4 us a call with
// four int[2] lists, where the op's kernel on a tiny tensor takes ~2 us. This one converts the argument kinds
// the fusedcnn schemas use (Tensor, Tensor?, int, int?, SymInt, bool, float, str, int[N], bool[N]) directly,
// positionally, and calls the same operator handle boxed: the same kernels, autograd kernel, dispatch keys and
// Python dispatch modes (TorchDispatchMode, FakeTensor) as torch.ops.
// Anything else goes to `overload` (the torch.ops OpOverload) unchanged, so it behaves as torch.ops there:
// keyword arguments, a tensor subclass or non-tensor in a Tensor slot, a TorchFunctionMode in force, a SymInt
// or other non-int in an int slot, a list of the wrong length.
// torch.compile never calls it: Python picks the OpOverload while tracing (python/fusedcnn/ops/_registry.py).
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <vector>

namespace fusedcnn {
namespace {

enum class Kind { Tensor, OptionalTensor, Int, OptionalInt, Bool, Float, Str, IntList, BoolList };

struct FastOp {
  c10::OperatorHandle op;
  PyObject* overload;            // strong reference: the torch.ops OpOverload, for every other call
  std::vector<Kind> kinds;       // one per schema argument
  std::vector<int64_t> lengths;  // int[N] / bool[N]: N (0: any length); else unused
  size_t returns;                // number of Tensor returns
};

// The Kind of a schema argument, or false when the fast path does not convert it.
bool kind_of(const c10::Argument& arg, Kind& kind) {
  const c10::TypePtr& type = arg.type();
  switch (type->kind()) {
    case c10::TypeKind::TensorType: kind = Kind::Tensor; return true;
    case c10::TypeKind::IntType:
    case c10::TypeKind::SymIntType: kind = Kind::Int; return true;
    case c10::TypeKind::BoolType: kind = Kind::Bool; return true;
    case c10::TypeKind::FloatType: kind = Kind::Float; return true;
    case c10::TypeKind::StringType: kind = Kind::Str; return true;
    case c10::TypeKind::OptionalType: {
      const c10::TypeKind inner = type->expectRef<c10::OptionalType>().getElementType()->kind();
      if (inner == c10::TypeKind::TensorType) { kind = Kind::OptionalTensor; return true; }
      if (inner == c10::TypeKind::IntType) { kind = Kind::OptionalInt; return true; }
      return false;
    }
    case c10::TypeKind::ListType: {
      const c10::TypeKind inner = type->expectRef<c10::ListType>().getElementType()->kind();
      if (inner == c10::TypeKind::IntType) { kind = Kind::IntList; return true; }
      if (inner == c10::TypeKind::BoolType) { kind = Kind::BoolList; return true; }
      return false;
    }
    default: return false;
  }
}

bool is_tensor(PyObject* obj) { return THPVariable_CheckExact(obj); }  // Tensor or Parameter, not a subclass

bool to_int(PyObject* obj, int64_t& value) {  // a Python int, not bool; false on overflow
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  value = PyLong_AsLongLongAndOverflow(obj, &overflow);
  return overflow == 0 && !(value == -1 && PyErr_Occurred());
}

// Pushes args[i] converted to its schema kind; false (nothing pushed) when it is not of the plain form.
bool push(const FastOp& f, size_t i, PyObject* obj, torch::jit::Stack& stack) {
  switch (f.kinds[i]) {
    case Kind::OptionalTensor:
      if (obj == Py_None) { stack.emplace_back(); return true; }
      [[fallthrough]];
    case Kind::Tensor:
      if (!is_tensor(obj)) return false;
      stack.emplace_back(THPVariable_Unpack(obj));
      return true;
    case Kind::OptionalInt:
      if (obj == Py_None) { stack.emplace_back(); return true; }
      [[fallthrough]];
    case Kind::Int: {
      int64_t v;
      if (!to_int(obj, v)) return false;
      stack.emplace_back(v);
      return true;
    }
    case Kind::Bool:
      if (!PyBool_Check(obj)) return false;
      stack.emplace_back(obj == Py_True);
      return true;
    case Kind::Float:
      if (PyFloat_CheckExact(obj)) { stack.emplace_back(PyFloat_AS_DOUBLE(obj)); return true; }
      if (PyLong_CheckExact(obj)) {
        int64_t v;
        if (!to_int(obj, v)) return false;
        stack.emplace_back(static_cast<double>(v));
        return true;
      }
      return false;
    case Kind::Str: {
      if (!PyUnicode_Check(obj)) return false;
      Py_ssize_t size = 0;
      const char* data = PyUnicode_AsUTF8AndSize(obj, &size);
      if (data == nullptr) return false;
      stack.emplace_back(std::string(data, size));
      return true;
    }
    case Kind::IntList:
    case Kind::BoolList: {
      if (!PyList_Check(obj) && !PyTuple_Check(obj)) return false;  // list, tuple, torch.Size
      const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
      if (f.lengths[i] != 0 && n != f.lengths[i]) return false;
      PyObject** items = PySequence_Fast_ITEMS(obj);
      if (f.kinds[i] == Kind::BoolList) {
        c10::List<bool> list;
        list.reserve(n);
        for (Py_ssize_t j = 0; j < n; ++j) {
          if (!PyBool_Check(items[j])) return false;
          list.push_back(items[j] == Py_True);
        }
        stack.emplace_back(std::move(list));
        return true;
      }
      c10::List<int64_t> list;
      list.reserve(n);
      for (Py_ssize_t j = 0; j < n; ++j) {
        int64_t v;
        if (!to_int(items[j], v)) return false;
        list.push_back(v);
      }
      stack.emplace_back(std::move(list));
      return true;
    }
  }
  return false;
}

FastOp& unpack(PyObject* capsule) { return *static_cast<FastOp*>(PyCapsule_GetPointer(capsule, nullptr)); }

PyObject* call(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  FastOp& f = unpack(self);
  const bool plain_call = (kwnames == nullptr || PyTuple_GET_SIZE(kwnames) == 0) &&
                          static_cast<size_t>(nargs) == f.kinds.size() && !at::impl::torch_function_mode_enabled();
  torch::jit::Stack stack;
  bool converted = plain_call;
  if (plain_call) {
    stack.reserve(std::max<size_t>(nargs, f.returns));
    for (Py_ssize_t i = 0; i < nargs && converted; ++i) converted = push(f, i, args[i], stack);
  }
  if (!converted) {
    if (PyErr_Occurred()) PyErr_Clear();  // an int that overflowed int64: the OpOverload says what is wrong
    return PyObject_Vectorcall(f.overload, args, nargs, kwnames);
  }
  {
    pybind11::gil_scoped_release no_gil;  // as torch.ops: kernels may run long; Python modes take the GIL back
    f.op.callBoxed(stack);
  }
  if (f.returns == 1) return THPVariable_Wrap(std::move(stack[0]).toTensor());
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(f.returns));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < f.returns; ++i) {
    PyObject* item = THPVariable_Wrap(std::move(stack[i]).toTensor());
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), item);
  }
  return out;
  END_HANDLE_TH_ERRORS
}

PyMethodDef call_def = {"fast_op", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call)),
                        METH_FASTCALL | METH_KEYWORDS, nullptr};

void destroy(PyObject* capsule) {
  FastOp* f = static_cast<FastOp*>(PyCapsule_GetPointer(capsule, nullptr));
  Py_XDECREF(f->overload);
  delete f;
}

// _fast_op(name: str, overload) -> the fast callable, or `overload` itself when the schema has an argument or a
// return the fast path does not convert.
PyObject* make_fast_op(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2 || !PyUnicode_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "_fast_op(name: str, overload)");
    return nullptr;
  }
  const char* name = PyUnicode_AsUTF8(args[0]);
  if (name == nullptr) return nullptr;
  auto f = std::make_unique<FastOp>(FastOp{c10::Dispatcher::singleton().findSchemaOrThrow(name, ""), args[1],
                                           {}, {}, 0});
  const c10::FunctionSchema& schema = f->op.schema();
  bool supported = !schema.is_vararg() && !schema.is_varret();
  for (const c10::Argument& arg : schema.arguments()) {
    Kind kind;
    supported = supported && !arg.kwarg_only() && kind_of(arg, kind);
    if (!supported) break;
    f->kinds.push_back(kind);
    f->lengths.push_back(arg.N().value_or(0));
  }
  for (const c10::Argument& ret : schema.returns()) supported = supported && ret.type()->kind() == c10::TypeKind::TensorType;
  f->returns = schema.returns().size();
  if (!supported || f->returns == 0) {
    Py_INCREF(args[1]);
    return args[1];
  }
  Py_INCREF(args[1]);
  PyObject* capsule = PyCapsule_New(f.get(), nullptr, destroy);
  if (capsule == nullptr) {
    Py_DECREF(args[1]);
    return nullptr;
  }
  f.release();
  PyObject* fn = PyCFunction_New(&call_def, capsule);
  Py_DECREF(capsule);
  return fn;
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef fast_call_methods[] = {
    {"_fast_op", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(make_fast_op)), METH_FASTCALL,
     "_fast_op(name, overload): op `name` called from Python with fewer conversions than torch.ops "
     "(see csrc/fast_call.cpp); `overload` serves every call it does not convert."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace fusedcnn
