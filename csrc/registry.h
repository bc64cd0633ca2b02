// Each op's .cpp registers its own pybind11 bindings here, so adding an op never edits a shared file.
//
// Headers: ATen's Tensor, the two factories the ops call, and torch's pybind11 casters for tensors.
// <torch/extension.h> would add the whole C++ frontend (nn, optim, data, autograd API), about 20 s of
// parsing per translation unit, none of which the ops use.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

namespace medpruner {

using Binder = void (*)(pybind11::module_&);

std::vector<Binder>& binders();

struct RegisterBindings {
  explicit RegisterBindings(Binder binder) { binders().push_back(binder); }
};

}  // namespace medpruner

#define MEDPRUNER_REGISTER_BINDINGS(fn) \
  static ::medpruner::RegisterBindings medpruner_register_##fn(fn)
