// IAF (inter-slice anchor filtering) on CPU: the exact sequential rule, one fused pass per distance.
//
// Each decision depends on the previous ones, so slices are scanned in order; the work inside one
// distance (a mean |a - b| over a slice) is what runs in parallel. Several volumes run one per thread
// instead, which avoids a parallel region per distance.
#include <omp.h>

#include <cmath>
#include <cstdint>

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

template <typename T>
inline double block_abs_diff(const T* a, const T* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += std::fabs(to_float(a[i]) - to_float(b[i]));
  return static_cast<double>(acc);
}

template <>
inline double block_abs_diff<double>(const double* a, const double* b, int64_t n) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += std::fabs(a[i] - b[i]);
  return acc;
}

template <typename T>
double mean_abs_diff(const T* a, const T* b, int64_t cols, bool parallel) {
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
  double total = 0.0;
#pragma omp parallel for reduction(+ : total) schedule(static) if (parallel && cols >= kParallelThreshold)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t begin = blk * kBlock;
    const int64_t n = std::min(kBlock, cols - begin);
    total += block_abs_diff(a + begin, b + begin, n);
  }
  return total / static_cast<double>(cols);
}

template <typename T>
void scan_segment(const T* x, int64_t row_stride, int64_t cols, int64_t start, int64_t end, double gamma,
                  bool* keep, float* dist, bool parallel) {
  if (end <= start) return;
  keep[start] = true;
  dist[start] = 0.f;
  int64_t anchor = start;
  for (int64_t s = start + 1; s < end; ++s) {
    const double d = mean_abs_diff(x + s * row_stride, x + anchor * row_stride, cols, parallel);
    dist[s] = static_cast<float>(d);
    if (d > gamma) {
      keep[s] = true;
      anchor = s;
    }
  }
}

template <typename T>
void iaf_impl(const torch::Tensor& slices, const int32_t* cu, int64_t segments, double gamma, bool* keep,
              float* dist) {
  const T* x = slices.data_ptr<T>();
  const int64_t row_stride = slices.stride(0);
  const int64_t cols = slices.size(1);
  if (segments >= omp_get_max_threads()) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t b = 0; b < segments; ++b)
      scan_segment(x, row_stride, cols, cu[b], cu[b + 1], gamma, keep, dist, false);
  } else {
    for (int64_t b = 0; b < segments; ++b)
      scan_segment(x, row_stride, cols, cu[b], cu[b + 1], gamma, keep, dist, true);
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
                             : static_cast<float>(mean_abs_diff(x + s * row_stride, x + anchor[s] * row_stride,
                                                                cols, false));
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
