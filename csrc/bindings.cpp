#include "registry.h"

namespace medpruner {

std::vector<Binder>& binders() {
  // Function-local static: safe against the unspecified order of static initialisation across files.
  static std::vector<Binder> registered;
  return registered;
}

}  // namespace medpruner

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "medpruner_kernels compiled CPU (OpenMP) kernels";
#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
  for (auto binder : medpruner::binders()) binder(m);
}
