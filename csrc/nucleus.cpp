// DINS nucleus selection on CPU: per slice, the fewest highest-mass tokens whose mass reaches tau.
//
// Slices are independent, so they run one per OpenMP thread. Within a slice the masses go into a
// max-heap ordered like the reference's stable descending sort (mass, then lower index first) and are
// popped until the prefix reaches tau: O(T + k log T) for k kept tokens, so peaked distributions (the
// usual case, a few % kept) never pay for a full sort, and the prefix sums are added in exactly the
// reference's order. Masses and sums are float64.
//
// With a fixed count per slice (the token budget) the heap holds the scores themselves: softmax and
// scores / sum both increase strictly with the score, so this is the exact mass order, without the
// ties that underflowed masses would create.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "registry.h"

namespace medpruner {
namespace {

constexpr int64_t kParallelThreshold = 16384;  // total tokens below which threads cost more than they save

struct Mass {
  double p;
  int64_t index;
};

// Heap order: "a < b" when a is popped after b (smaller mass, or the same mass at a higher index).
inline bool pops_later(const Mass& a, const Mass& b) {
  return a.p < b.p || (a.p == b.p && a.index > b.index);
}

struct Rule {
  std::optional<double> temperature;
  int64_t min_keep;
  int64_t max_keep;  // already the effective upper bound when the caller gave none
};

// Keeps the `count` largest scores of one slice of n tokens read at x[t * stride] (ties: lower index).
template <typename T>
void select_fixed(const T* x, int64_t stride, int64_t n, int64_t count, bool* keep, std::vector<Mass>& heap) {
  if (n <= 0) return;
  std::fill(keep, keep + n, false);
  heap.resize(n);
  // -0.0 and +0.0 compare equal as doubles, so they tie like equal masses.
  for (int64_t t = 0; t < n; ++t) heap[t] = {static_cast<double>(x[t * stride]), t};
  std::make_heap(heap.begin(), heap.end(), pops_later);
  auto end = heap.end();
  for (int64_t taken = 0; taken < count; ++taken) {
    std::pop_heap(heap.begin(), end, pops_later);
    --end;
    keep[end->index] = true;
  }
}

// Selects within one slice of n tokens read at x[t * stride]; writes keep[0..n).
template <typename T>
void select_slice(const T* x, int64_t stride, int64_t n, double tau, const Rule& rule, bool* keep,
                  std::vector<Mass>& heap) {
  if (n <= 0) return;
  std::fill(keep, keep + n, false);
  const int64_t upper = std::min(rule.max_keep, n);
  heap.resize(n);
  double total = 0.0;
  if (rule.temperature) {
    double x_max = -INFINITY;
    for (int64_t t = 0; t < n; ++t) x_max = std::max(x_max, static_cast<double>(x[t * stride]));
    // (x - max) / T rather than x / T - max(x / T): only the difference can be large, and its exp
    // underflows to the right limit 0.
    for (int64_t t = 0; t < n; ++t) {
      const double e = std::exp((static_cast<double>(x[t * stride]) - x_max) / *rule.temperature);
      heap[t] = {e, t};
      total += e;
    }
  } else {
    for (int64_t t = 0; t < n; ++t) {
      const double v = static_cast<double>(x[t * stride]);
      heap[t] = {v, t};
      total += v;
    }
  }

  // tau >= 1 and an all-zero slice (only possible without a temperature) fix the count up front.
  const bool fixed = tau >= 1.0 || total == 0.0;
  const int64_t target = tau >= 1.0 ? upper : std::min(rule.min_keep, upper);
  if (fixed && target == n) {
    std::fill(keep, keep + n, true);
    return;
  }
  if (total > 0.0) {
    for (auto& m : heap) m.p /= total;
  }
  std::make_heap(heap.begin(), heap.end(), pops_later);
  double cumulative = 0.0;
  int64_t taken = 0;
  auto end = heap.end();
  while (taken < upper && (fixed ? taken < target : (taken < rule.min_keep || cumulative < tau))) {
    std::pop_heap(heap.begin(), end, pops_later);
    --end;
    cumulative += end->p;
    keep[end->index] = true;
    ++taken;
  }
}

template <typename T>
void select_all(const at::Tensor& scores, const double* tau, double tau_scalar, const int64_t* cu,
                const int64_t* counts, int64_t slices, const Rule& rule, bool* keep) {
  const T* x = scores.data_ptr<T>();
  const bool varlen = cu != nullptr;
  const int64_t tokens = varlen ? 0 : scores.size(1);
  const int64_t row_stride = varlen ? 0 : scores.stride(0);
  const int64_t tok_stride = varlen ? scores.stride(0) : scores.stride(1);
  const bool parallel = scores.numel() >= kParallelThreshold && slices > 1;
#pragma omp parallel if (parallel)
  {
    std::vector<Mass> heap;
#pragma omp for schedule(dynamic, 4)
    for (int64_t s = 0; s < slices; ++s) {
      const int64_t start = varlen ? cu[s] : s * tokens;
      const int64_t n = varlen ? cu[s + 1] - cu[s] : tokens;
      const T* slice = varlen ? x + start * tok_stride : x + s * row_stride;
      if (counts) {
        select_fixed(slice, tok_stride, n, std::clamp<int64_t>(counts[s], 0, n), keep + start, heap);
      } else {
        select_slice(slice, tok_stride, n, tau ? tau[s] : tau_scalar, rule, keep + start, heap);
      }
    }
  }
}

at::Tensor nucleus_select_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& tau,
                                 double tau_scalar, const std::optional<at::Tensor>& cu_seqlens,
                                 std::optional<double> temperature, int64_t min_keep,
                                 std::optional<int64_t> max_keep, const std::optional<at::Tensor>& counts) {
  TORCH_CHECK(scores.device().is_cpu(), "nucleus_select_cpu: scores must be a CPU tensor");
  const bool varlen = cu_seqlens.has_value();
  TORCH_CHECK(scores.dim() == (varlen ? 1 : 2), "nucleus_select_cpu: scores must be ",
              varlen ? "1-D with cu_seqlens" : "2-D [S, T]");
  int64_t slices = varlen ? cu_seqlens->numel() - 1 : scores.size(0);
  const int64_t* cu = nullptr;
  if (varlen) {
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kLong && cu_seqlens->is_contiguous() && slices >= 0,
                "nucleus_select_cpu: cu_seqlens must be contiguous int64 [B+1]");
    cu = cu_seqlens->data_ptr<int64_t>();
    // The Python layer validates the offsets; this guard keeps a direct call memory-safe.
    for (int64_t s = 0; s <= slices; ++s) {
      TORCH_CHECK(cu[s] >= 0 && cu[s] <= scores.size(0) && (s == 0 || cu[s] >= cu[s - 1]),
                  "nucleus_select_cpu: cu_seqlens must be non-decreasing within [0, total_tokens]");
    }
  }
  const double* tau_ptr = nullptr;
  if (tau.has_value()) {
    TORCH_CHECK(tau->scalar_type() == at::kDouble && tau->is_contiguous() && tau->numel() == slices,
                "nucleus_select_cpu: tau must be contiguous float64 [S]");
    tau_ptr = tau->data_ptr<double>();
  }
  const int64_t* counts_ptr = nullptr;
  if (counts.has_value()) {
    TORCH_CHECK(counts->scalar_type() == at::kLong && counts->is_contiguous() && counts->numel() == slices,
                "nucleus_select_cpu: counts must be contiguous int64 [S]");
    counts_ptr = counts->data_ptr<int64_t>();
  }
  TORCH_CHECK(!temperature || *temperature > 0, "nucleus_select_cpu: temperature must be > 0");
  const Rule rule{temperature, min_keep, max_keep.value_or(INT64_MAX)};
  auto keep = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "nucleus_select_cpu", [&] {
      select_all<scalar_t>(scores, tau_ptr, tau_scalar, cu, counts_ptr, slices, rule, keep.data_ptr<bool>());
    });
  }
  return keep;
}

void bind_nucleus(pybind11::module_& m) {
  m.def("nucleus_select_cpu", &nucleus_select_cpu, pybind11::arg("scores"), pybind11::arg("tau"),
        pybind11::arg("tau_scalar"), pybind11::arg("cu_seqlens"), pybind11::arg("temperature"),
        pybind11::arg("min_keep"), pybind11::arg("max_keep"), pybind11::arg("counts") = pybind11::none(),
        "Nucleus keep mask per slice (see medpruner_kernels.nucleus_select); float64 masses, OpenMP over "
        "slices; with counts, the counts[s] largest scores of slice s");
}

}  // namespace

MEDPRUNER_REGISTER_BINDINGS(bind_nucleus);

}  // namespace medpruner
