// IAF (inter-slice anchor filtering) on CPU: the exact sequential rule, one fused pass per distance.
//
// Each decision depends on the previous ones, so slices are scanned in order; the work inside one
// distance (a mean |a - b| over a slice) is what runs in parallel. Several volumes run one per thread
// instead, which avoids a parallel region per distance.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "registry.h"

namespace medpruner {
namespace {

constexpr int64_t kBlock = 4096;               // float accumulators per block, then double across blocks
constexpr int64_t kParallelThreshold = 32768;  // below this a parallel region costs more than it saves

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}
template <>
inline float to_float<c10::Half>(c10::Half v) {
  return static_cast<float>(v);
}
template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 v) {
  return static_cast<float>(v);
}

// kLanes independent float accumulators: one accumulator is a chain of dependent adds whose latency,
// not memory, would bound the loop; several vector registers' worth keep the loads streaming.
constexpr int64_t kLanes = 32;

template <typename T>
inline double block_abs_diff(const T* a, const T* b, int64_t n) {
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

// float32 volumes are the common case and memory bound only with wide vectors: an AVX2 clone is
// picked at load time where the CPU has it, the baseline build stays portable.
__attribute__((target_clones("avx2", "default"))) double float_abs_diff(const float* a, const float* b,
                                                                         int64_t n) {
  float lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kLanes; ++j) lane[j] += std::fabs(a[i + j] - b[i + j]);
  }
  for (; i < n; ++i) lane[i % kLanes] += std::fabs(a[i] - b[i]);
  double total = 0.0;
  for (int64_t j = 0; j < kLanes; ++j) total += lane[j];
  return total;
}

template <>
inline double block_abs_diff<float>(const float* a, const float* b, int64_t n) {
  return float_abs_diff(a, b, n);
}

template <>
inline double block_abs_diff<double>(const double* a, const double* b, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += std::fabs(a[i] - b[i]);
  return acc;
}

template <typename T>
double mean_abs_diff(const T* a, const T* b, int64_t cols) {
  double total = 0.0;
  for (int64_t begin = 0; begin < cols; begin += kBlock)
    total += block_abs_diff(a + begin, b + begin, std::min(kBlock, cols - begin));
  return total / static_cast<double>(cols);
}

template <typename T>
void scan_segment(const T* x, int64_t row_stride, int64_t cols, int64_t start, int64_t end, double gamma,
                  bool* keep, float* dist) {
  if (end <= start) return;
  keep[start] = true;
  dist[start] = 0.f;
  int64_t anchor = start;
  for (int64_t s = start + 1; s < end; ++s) {
    const double d = mean_abs_diff(x + s * row_stride, x + anchor * row_stride, cols);
    dist[s] = static_cast<float>(d);
    if (d > gamma) {
      keep[s] = true;
      anchor = s;
    }
  }
}

// One volume on all threads: a single parallel region for the whole scan (not one per slice), each
// thread owning the same column range of every slice, so its part of the anchor stays in its own
// cache. Per slice the threads publish partial sums, meet at one barrier (the partials are double
// buffered, so a thread may start the next slice while others still read this one), and every
// thread derives the same decision from the partials summed in thread order.
template <typename T>
void scan_segment_parallel(const T* x, int64_t row_stride, int64_t cols, int64_t start, int64_t end,
                           double gamma, bool* keep, float* dist) {
  if (end <= start) return;
  keep[start] = true;
  dist[start] = 0.f;
  constexpr int kPad = 8;  // one cache line per thread's partial
  const int threads = omp_get_max_threads();
  std::vector<double> partial(2 * static_cast<size_t>(threads) * kPad, 0.0);
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
    const int team = omp_get_num_threads();
    const int64_t first = blocks * thread / team;
    const int64_t last = blocks * (thread + 1) / team;
    int64_t anchor = start;
    for (int64_t s = start + 1; s < end; ++s) {
      double acc = 0.0;
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t begin = blk * kBlock;
        acc += block_abs_diff(x + s * row_stride + begin, x + anchor * row_stride + begin,
                              std::min(kBlock, cols - begin));
      }
      double* slot = partial.data() + (s & 1) * threads * kPad;
      slot[thread * kPad] = acc;
#pragma omp barrier
      double total = 0.0;
      for (int t = 0; t < team; ++t) total += slot[t * kPad];
      const double d = total / static_cast<double>(cols);
      if (d > gamma) anchor = s;
      if (thread == 0) {
        dist[s] = static_cast<float>(d);
        keep[s] = d > gamma;
      }
    }
  }
}

template <typename T>
void iaf_impl(const torch::Tensor& slices, const int32_t* cu, int64_t segments, double gamma, bool* keep,
              float* dist) {
  const T* x = slices.data_ptr<T>();
  const int64_t row_stride = slices.stride(0);
  const int64_t cols = slices.size(1);
  if (segments >= omp_get_max_threads() || cols < kParallelThreshold) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < segments; ++b)
      scan_segment(x, row_stride, cols, cu[b], cu[b + 1], gamma, keep, dist);
  } else {
    for (int64_t b = 0; b < segments; ++b)
      scan_segment_parallel(x, row_stride, cols, cu[b], cu[b + 1], gamma, keep, dist);
  }
}

template <typename T>
void anchor_distance_impl(const torch::Tensor& slices, const int64_t* anchor, float* dist) {
  const T* x = slices.data_ptr<T>();
  const int64_t row_stride = slices.stride(0);
  const int64_t rows = slices.size(0);
  const int64_t cols = slices.size(1);
  // Every distance is independent here (the anchors are given), so rows run in parallel.
#pragma omp parallel for schedule(static)
  for (int64_t s = 0; s < rows; ++s) {
    dist[s] = anchor[s] == s ? 0.f
                             : static_cast<float>(mean_abs_diff(x + s * row_stride, x + anchor[s] * row_stride, cols));
  }
}

void check_slices(const torch::Tensor& slices) {
  TORCH_CHECK(slices.device().is_cpu(), "slices must be a CPU tensor");
  TORCH_CHECK(slices.dim() == 2, "slices must be [rows, cols]");
  TORCH_CHECK(slices.size(0) == 0 || slices.stride(1) == 1, "slices must have unit column stride");
}

template <typename Fn>
void dispatch_volume_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kByte: fn(uint8_t{}); break;
    case at::kShort: fn(int16_t{}); break;
    default: TORCH_CHECK(false, "unsupported volume dtype ", dtype);
  }
}

std::tuple<torch::Tensor, torch::Tensor> iaf_select_cpu(const torch::Tensor& slices,
                                                       const torch::Tensor& cu_seqlens, double gamma) {
  check_slices(slices);
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt && cu_seqlens.is_contiguous(), "cu_seqlens must be int32");
  const int64_t rows = slices.size(0);
  auto keep = torch::zeros({rows}, slices.options().dtype(at::kBool));
  auto dist = torch::zeros({rows}, slices.options().dtype(at::kFloat));
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int64_t segments = cu_seqlens.numel() - 1;
  dispatch_volume_dtype(slices.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    iaf_impl<T>(slices, cu, segments, gamma, keep.data_ptr<bool>(), dist.data_ptr<float>());
  });
  return {keep, dist};
}

torch::Tensor anchor_distances_cpu(const torch::Tensor& slices, const torch::Tensor& anchor) {
  check_slices(slices);
  TORCH_CHECK(anchor.scalar_type() == at::kLong && anchor.is_contiguous() && anchor.numel() == slices.size(0),
              "anchor must be int64 [rows]");
  auto dist = torch::zeros({slices.size(0)}, slices.options().dtype(at::kFloat));
  dispatch_volume_dtype(slices.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    anchor_distance_impl<T>(slices, anchor.data_ptr<int64_t>(), dist.data_ptr<float>());
  });
  return dist;
}

void bind_iaf(pybind11::module_& m) {
  m.def("iaf_select", &iaf_select_cpu, "IAF keep mask and anchor distances over [rows, cols] slices",
        pybind11::arg("slices"), pybind11::arg("cu_seqlens"), pybind11::arg("gamma"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("anchor_distances", &anchor_distances_cpu, "mean |x[s] - x[anchor[s]]| per row",
        pybind11::arg("slices"), pybind11::arg("anchor"), pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace

MEDPRUNER_REGISTER_BINDINGS(bind_iaf);

}  // namespace medpruner
