// IAF (inter-slice anchor filtering) on CPU: the exact sequential rule, one fused pass per distance.
//
// Each decision depends on the previous ones, so slices are scanned in order; the work inside one
// distance (a mean |a - b| over a slice) is what runs in parallel. Several volumes run one per thread
// instead, which avoids a parallel region per distance.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
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

// The parallel scan decides two slices per sweep: with a = the anchor, s and n = s + 1, it sums
// |s - a|, |n - a| and |n - s| in one pass over the columns, so the anchor is read once per two
// slices and the threads meet once per two slices. Which of |n - a| and |n - s| counts is known
// once s is decided.
constexpr int64_t kPairLanes = 16;

template <typename T>
inline void block_pair_abs_diff(const T* s, const T* n, const T* a, int64_t len, double out[3]) {
  float sa[kPairLanes] = {}, na[kPairLanes] = {}, ns[kPairLanes] = {};
  int64_t i = 0;
  for (; i + kPairLanes <= len; i += kPairLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kPairLanes; ++j) {
      const float vs = to_float(s[i + j]), vn = to_float(n[i + j]), va = to_float(a[i + j]);
      sa[j] += std::fabs(vs - va);
      na[j] += std::fabs(vn - va);
      ns[j] += std::fabs(vn - vs);
    }
  }
  for (; i < len; ++i) {
    const float vs = to_float(s[i]), vn = to_float(n[i]), va = to_float(a[i]);
    sa[i % kPairLanes] += std::fabs(vs - va);
    na[i % kPairLanes] += std::fabs(vn - va);
    ns[i % kPairLanes] += std::fabs(vn - vs);
  }
  for (int64_t j = 0; j < kPairLanes; ++j) {
    out[0] += sa[j];
    out[1] += na[j];
    out[2] += ns[j];
  }
}

__attribute__((target_clones("avx2", "default"))) void float_pair_abs_diff(const float* s, const float* n,
                                                                            const float* a, int64_t len,
                                                                            double out[3]) {
  block_pair_abs_diff<float>(s, n, a, len, out);
}

template <>
inline void block_pair_abs_diff<double>(const double* s, const double* n, const double* a, int64_t len,
                                        double out[3]) {
  for (int64_t i = 0; i < len; ++i) {
    out[0] += std::fabs(s[i] - a[i]);
    out[1] += std::fabs(n[i] - a[i]);
    out[2] += std::fabs(n[i] - s[i]);
  }
}

template <typename T>
inline void pair_abs_diff(const T* s, const T* n, const T* a, int64_t len, double out[3]) {
  if constexpr (std::is_same_v<T, float>) {
    float_pair_abs_diff(s, n, a, len, out);
  } else {
    block_pair_abs_diff<T>(s, n, a, len, out);
  }
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
// cache. Per sweep (two slices, see block_pair_abs_diff) the threads publish partial sums, meet at one
// barrier (the partials are double buffered, so a thread may start the next sweep while others still
// read this one), and every thread derives the same decisions from the partials summed in thread order.
template <typename T>
void scan_segment_parallel(const T* x, int64_t row_stride, int64_t cols, int64_t start, int64_t end,
                           double gamma, bool* keep, float* dist) {
  if (end <= start) return;
  keep[start] = true;
  dist[start] = 0.f;
  constexpr int kPad = 8;  // one cache line per thread's three partials
  const int threads = omp_get_max_threads();
  std::vector<double> partial(2 * static_cast<size_t>(threads) * kPad, 0.0);
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
  const double inv_cols = 1.0 / static_cast<double>(cols);
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
    const int team = omp_get_num_threads();
    const int64_t first = blocks * thread / team;
    const int64_t last = blocks * (thread + 1) / team;
    int64_t anchor = start;
    int64_t sweep = 0;
    for (int64_t s = start + 1; s < end; s += 2, ++sweep) {
      const bool has_next = s + 1 < end;
      double* slot = partial.data() + (sweep & 1) * threads * kPad;
      double* mine = slot + thread * kPad;
      mine[0] = mine[1] = mine[2] = 0.0;
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t begin = blk * kBlock;
        const int64_t len = std::min(kBlock, cols - begin);
        const T* xs = x + s * row_stride + begin;
        const T* xa = x + anchor * row_stride + begin;
        if (has_next) {
          pair_abs_diff(xs, x + (s + 1) * row_stride + begin, xa, len, mine);
        } else {
          mine[0] += block_abs_diff(xs, xa, len);
        }
      }
#pragma omp barrier
      double to_anchor = 0.0, next_to_anchor = 0.0, next_to_s = 0.0;
      for (int t = 0; t < team; ++t) {
        to_anchor += slot[t * kPad];
        next_to_anchor += slot[t * kPad + 1];
        next_to_s += slot[t * kPad + 2];
      }
      const double d = to_anchor * inv_cols;
      const bool keep_s = d > gamma;
      if (keep_s) anchor = s;
      double d_next = 0.0;
      bool keep_next = false;
      if (has_next) {
        d_next = (keep_s ? next_to_s : next_to_anchor) * inv_cols;
        keep_next = d_next > gamma;
        if (keep_next) anchor = s + 1;
      }
      if (thread == 0) {
        dist[s] = static_cast<float>(d);
        keep[s] = keep_s;
        if (has_next) {
          dist[s + 1] = static_cast<float>(d_next);
          keep[s + 1] = keep_next;
        }
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

// NaN/Inf in a volume surfaces in every distance it enters, and every slice of a volume of two or
// more slices enters one (slice 0 with slice 1), so checking the distances costs no second read of the
// volume; only a 1-slice volume, which compares nothing, is read again. Raised here rather than by
// the caller, because the first torch op after a pass that streamed the whole volume runs with cold
// caches and costs more than this loop.
template <typename T>
bool row_is_finite(const T* row, int64_t cols) {
  float acc = 0.f;
  // Any order of the adds gives NaN for any NaN or Inf, so the reduction may be vectorised.
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < cols; ++i) acc += to_float(row[i]) * 0.f;
  return acc == 0.f;
}

void check_finite(const char* op, const torch::Tensor& slices, const float* dist,
                  const std::vector<int64_t>& lone_rows) {
  if (!at::isFloatingType(slices.scalar_type())) return;
  bool finite = true;
  for (int64_t s = 0; s < slices.size(0); ++s) finite = finite && std::isfinite(dist[s]);
  dispatch_volume_dtype(slices.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = slices.data_ptr<T>();
    const int64_t lone = static_cast<int64_t>(lone_rows.size());
    // A [B, 1, ...] batch makes every row lone: then this is a whole pass over the volume.
#pragma omp parallel for reduction(&& : finite) schedule(static)
    for (int64_t r = 0; r < lone; ++r)
      finite = finite && row_is_finite(x + lone_rows[r] * slices.stride(0), slices.size(1));
  });
  if (!finite)
    throw pybind11::value_error(std::string(op) +
                                ": volume contains NaN or Inf (or values whose differences overflow float32)");
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
  std::vector<int64_t> lone_rows;
  for (int64_t b = 0; b < segments; ++b)
    if (cu[b + 1] - cu[b] == 1) lone_rows.push_back(cu[b]);
  check_finite("iaf_select", slices, dist.data_ptr<float>(), lone_rows);
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
  // A volume's first slice is its own anchor, and the next slice of the same volume compares with it.
  const int64_t* a = anchor.data_ptr<int64_t>();
  const int64_t rows = slices.size(0);
  std::vector<int64_t> lone_rows;
  for (int64_t s = 0; s < rows; ++s)
    if (a[s] == s && (s + 1 == rows || a[s + 1] != s)) lone_rows.push_back(s);
  check_finite("anchor_distances", slices, dist.data_ptr<float>(), lone_rows);
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
