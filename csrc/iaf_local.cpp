// Local-change IAF on CPU: the exact sequential rule of iaf_local_select, where a slice's distance to
// its anchor is the largest mean |difference| over its blocks (contiguous runs of `block` elements).
//
// Slices are scanned in order, as in iaf.cpp; the blocks of one comparison are independent, so a
// single volume runs its blocks on all threads, and a batch of volumes runs one volume per thread.
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "registry.h"
#include "volume.h"

namespace medpruner {
namespace {

constexpr int64_t kLanes = 16;
// Columns per comparison below which a parallel region costs more than it saves.
constexpr int64_t kParallelThreshold = 32768;

// Sum of |a - b| over one block, in kLanes float accumulators (a chain of dependent adds would bound
// the loop by latency) added in double at the end. uint8/int16 differences stay exact in float for
// blocks of up to 2^24 / 65535 * kLanes elements per lane sum, far above any encoder patch.
template <typename T>
double block_sum(const T* a, const T* b, int64_t n) {
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += std::fabs(to_float(a[i + j]) - to_float(b[i + j]));
  }
  for (; i < n; ++i) lane[i % kLanes] += std::fabs(to_float(a[i]) - to_float(b[i]));
  double total = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) total += lane[j];
  return total;
}

template <>
double block_sum<double>(const double* a, const double* b, int64_t n) {
  double total = 0.0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += std::fabs(a[i] - b[i]);
  return total;
}

// The largest block mean of |a - b| over blocks [first, last). NaN anywhere makes the result NaN
// (std::max would drop it).
template <typename T>
double local_distance(const T* a, const T* b, int64_t block, int64_t first, int64_t last) {
  double largest = 0.0;
  for (int64_t k = first; k < last; ++k) {
    const double mean = block_sum(a + k * block, b + k * block, block) / static_cast<double>(block);
    largest = std::isnan(mean) || std::isnan(largest) ? std::nan("") : std::max(largest, mean);
  }
  return largest;
}

template <typename T>
void scan_segment(const T* x, int64_t row_stride, int64_t cols, int64_t block, int64_t start, int64_t end,
                  double gamma, bool* keep, float* dist) {
  if (end <= start) return;
  keep[start] = true;
  dist[start] = 0.f;
  int64_t anchor = start;
  for (int64_t s = start + 1; s < end; ++s) {
    const double d = local_distance(x + s * row_stride, x + anchor * row_stride, block, 0, cols / block);
    dist[s] = static_cast<float>(d);
    keep[s] = d > gamma;
    if (keep[s]) anchor = s;
  }
}

// One volume on all threads: a single parallel region for the whole scan (a region per comparison
// waits for a sleeping thread to wake each time: 7 ms a comparison beside a busy neighbour), each
// thread owning the same blocks of every slice. Per comparison the threads publish their partial
// maxima, meet at one barrier (double-buffered partials: a thread may start the next comparison while
// others still read this one), and each derives the same decision from all the partials.
template <typename T>
void scan_segment_parallel(const T* x, int64_t row_stride, int64_t cols, int64_t block, int64_t start,
                           int64_t end, double gamma, bool* keep, float* dist) {
  if (end <= start) return;
  keep[start] = true;
  dist[start] = 0.f;
  struct alignas(64) Partial {
    double largest;
  };
  const int threads = omp_get_max_threads();
  std::vector<Partial> partial(2 * static_cast<size_t>(threads));
  const int64_t blocks = cols / block;
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
    const int team = omp_get_num_threads();
    const int64_t first = blocks * thread / team;
    const int64_t last = blocks * (thread + 1) / team;
    int64_t anchor = start;
    for (int64_t s = start + 1; s < end; ++s) {
      Partial* slot = partial.data() + ((s - start) & 1) * threads;
      slot[thread].largest = local_distance(x + s * row_stride, x + anchor * row_stride, block, first, last);
#pragma omp barrier
      double d = 0.0;
      for (int t = 0; t < team; ++t)
        d = std::isnan(slot[t].largest) || std::isnan(d) ? std::nan("") : std::max(d, slot[t].largest);
      const bool kept = d > gamma;
      if (thread == 0) {
        dist[s] = static_cast<float>(d);
        keep[s] = kept;
      }
      if (kept) anchor = s;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> iaf_local_select_cpu(const at::Tensor& slices,
                                                        const std::optional<at::Tensor>& cu_seqlens,
                                                        int64_t seqlen, int64_t block, double gamma) {
  check_slices(slices);
  const int64_t rows = slices.size(0);
  const int64_t cols = slices.size(1);
  TORCH_CHECK(block > 0 && cols % block == 0, "block must divide the slice size");
  const std::vector<int32_t> cu = segment_offsets(cu_seqlens, seqlen, rows);
  const int64_t segments = static_cast<int64_t>(cu.size()) - 1;
  auto keep = at::empty({rows}, slices.options().dtype(at::kBool));
  auto dist = at::empty({rows}, slices.options().dtype(at::kFloat));
  bool* keep_out = keep.data_ptr<bool>();
  float* dist_out = dist.data_ptr<float>();
  dispatch_volume_dtype(slices.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = slices.data_ptr<T>();
    const int64_t row_stride = slices.stride(0);
    if (segments >= omp_get_max_threads() || cols < kParallelThreshold || cols / block < 2) {
#pragma omp parallel for schedule(dynamic, 1)
      for (int64_t b = 0; b < segments; ++b)
        scan_segment(x, row_stride, cols, block, cu[b], cu[b + 1], gamma, keep_out, dist_out);
    } else {
      for (int64_t b = 0; b < segments; ++b)
        scan_segment_parallel(x, row_stride, cols, block, cu[b], cu[b + 1], gamma, keep_out, dist_out);
    }
  });
  std::vector<int64_t> lone_rows;
  for (int64_t b = 0; b < segments; ++b)
    if (cu[b + 1] - cu[b] == 1) lone_rows.push_back(cu[b]);
  check_finite("iaf_local_select", slices, dist_out, lone_rows);
  return {keep, dist};
}

void bind_iaf_local(pybind11::module_& m) {
  m.def("iaf_local_select", &iaf_local_select_cpu,
        "local-change IAF keep mask and anchor distances (largest block mean) over [rows, cols] slices; "
        "volumes at cu_seqlens, or of seqlen rows each when cu_seqlens is None",
        pybind11::arg("slices"), pybind11::arg("cu_seqlens"), pybind11::arg("seqlen"), pybind11::arg("block"),
        pybind11::arg("gamma"), pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace

MEDPRUNER_REGISTER_BINDINGS(bind_iaf_local);

}  // namespace medpruner
