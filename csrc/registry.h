// Each op's .cpp registers its own pybind11 bindings here, so adding an op never edits a shared file.
#pragma once
#include <torch/extension.h>

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
