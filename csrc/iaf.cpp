// IAF (inter-slice anchor filtering) on CPU: the exact sequential rule, one fused pass per sweep of
// three slices (see kSweep).
//
// Each decision depends on the previous ones, so slices are scanned in order; the work inside one
// sweep (sums of |a - b| over the columns) is what runs in parallel. Several volumes run one per thread
// instead, which avoids a parallel region per distance.
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "registry.h"
#include "volume.h"

namespace medpruner {
namespace {

constexpr int64_t kBlock = 4096;               // float accumulators per block, then double across blocks
constexpr int64_t kParallelThreshold = 32768;  // below this a parallel region costs more than it saves


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

// The scans decide three slices per sweep. With a = the anchor and s0, s1, s2 the next slices, one
// pass over the columns sums each slice's |difference| to the anchor and to the earlier slices of the
// sweep: the anchor entering slice k is a or one of the earlier slices, so these six sums decide all
// three in order. The anchor is read once per three slices (and the threads meet once per three), and
// three streamed rows per thread keep more loads in flight than one or two: measured 7-9% faster
// than two slices per sweep on the 2-core development VM, at or under the time of one plain read.
// Four slices (ten sums) were no faster. sums[k * (k + 1) / 2 + j] pairs slice k with position j of
// (a, s0, s1).
constexpr int kSweep = 3;
constexpr int kSweepSums = kSweep * (kSweep + 1) / 2;
constexpr int64_t kSweepLanes = 8;
constexpr int64_t kSweepBlock = 2048;  // 256 adds per float lane (as with two slices), then double
// uint8 and int16 |differences| (<= 65535) then sum exactly in a float lane (< 2^24).
static_assert(kSweepBlock / kSweepLanes * 65535 < (1 << 24), "integer sums must stay exact in float lanes");

// always_inline: each target clone below must compile its own copy of the loop (a call from the AVX2
// clone into a baseline body would run the baseline code).
template <typename T>
__attribute__((always_inline)) inline void block_sweep_sums(const T* s0, const T* s1, const T* s2, const T* a,
                                                            int64_t len, double sums[kSweepSums]) {
  float acc[kSweepSums][kSweepLanes] = {};
  int64_t i = 0;
  for (; i + kSweepLanes <= len; i += kSweepLanes) {
#pragma omp simd
    for (int64_t j = 0; j < kSweepLanes; ++j) {
      const float va = to_float(a[i + j]), v0 = to_float(s0[i + j]), v1 = to_float(s1[i + j]),
                  v2 = to_float(s2[i + j]);
      acc[0][j] += std::fabs(v0 - va);
      acc[1][j] += std::fabs(v1 - va);
      acc[2][j] += std::fabs(v1 - v0);
      acc[3][j] += std::fabs(v2 - va);
      acc[4][j] += std::fabs(v2 - v0);
      acc[5][j] += std::fabs(v2 - v1);
    }
  }
  for (; i < len; ++i) {
    const float va = to_float(a[i]), v0 = to_float(s0[i]), v1 = to_float(s1[i]), v2 = to_float(s2[i]);
    const int64_t j = i % kSweepLanes;
    acc[0][j] += std::fabs(v0 - va);
    acc[1][j] += std::fabs(v1 - va);
    acc[2][j] += std::fabs(v1 - v0);
    acc[3][j] += std::fabs(v2 - va);
    acc[4][j] += std::fabs(v2 - v0);
    acc[5][j] += std::fabs(v2 - v1);
  }
  for (int k = 0; k < kSweepSums; ++k)
    for (int64_t j = 0; j < kSweepLanes; ++j) sums[k] += acc[k][j];
}

template <typename T>
__attribute__((always_inline)) inline void widen(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// Half on a CPU with F16C: eight values per instruction.
__attribute__((target("avx2,f16c"))) void widen_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

// uint8 and half widen a tile of each of the four rows into L1 first, then run the float loop: each
// conversion is then a plain loop the compiler vectorises at full width. Converted inside the six-sum
// loop they vectorised badly (uint8 at 13 ms for a 28 MB volume, 3.5-4.9 ms widened; half 13-17 ms,
// 9-12 ms widened). bfloat16 and int16 convert in one or two instructions and run faster inside the
// loop (5.2-5.5 ms, 7.6-9.5 ms widened), so they stay there.
template <typename T, void (*Widen)(const T*, float*, int64_t) = widen<T>>
__attribute__((always_inline)) inline void widened_sweep_sums(const T* s0, const T* s1, const T* s2, const T* a,
                                                              int64_t len, double sums[kSweepSums]) {
  constexpr int64_t kTile = 512;
  alignas(64) float tile[kSweep + 1][kTile];
  for (int64_t b = 0; b < len; b += kTile) {
    const int64_t n = std::min(kTile, len - b);
    Widen(a + b, tile[0], n);
    Widen(s0 + b, tile[1], n);
    Widen(s1 + b, tile[2], n);
    Widen(s2 + b, tile[3], n);
    block_sweep_sums<float>(tile[1], tile[2], tile[3], tile[0], n, sums);
  }
}

// Every dtype but double gets an AVX2 clone, picked at load time where the CPU has it; the baseline
// build (SSE2) stays portable.
#define MEDPRUNER_SWEEP_BLOCK(T, body)                                                                    \
  __attribute__((target_clones("avx2", "default"))) void sweep_block(const T* s0, const T* s1, const T* s2, \
                                                                    const T* a, int64_t len,               \
                                                                    double sums[kSweepSums]) {             \
    body<T>(s0, s1, s2, a, len, sums);                                                                    \
  }
MEDPRUNER_SWEEP_BLOCK(float, block_sweep_sums)
MEDPRUNER_SWEEP_BLOCK(c10::BFloat16, block_sweep_sums)
MEDPRUNER_SWEEP_BLOCK(int16_t, block_sweep_sums)
MEDPRUNER_SWEEP_BLOCK(uint8_t, widened_sweep_sums)
#undef MEDPRUNER_SWEEP_BLOCK

// Half widens with F16C where the CPU has it, elsewhere from the bit pattern (target_clones cannot
// pick on F16C and AVX2 together, so the choice is made here once).
__attribute__((target("avx2,f16c"))) void half_sweep_block_f16c(const c10::Half* s0, const c10::Half* s1,
                                                               const c10::Half* s2, const c10::Half* a,
                                                               int64_t len, double sums[kSweepSums]) {
  widened_sweep_sums<c10::Half, widen_f16c>(s0, s1, s2, a, len, sums);
}

__attribute__((target_clones("avx2", "default"))) void half_sweep_block_portable(
    const c10::Half* s0, const c10::Half* s1, const c10::Half* s2, const c10::Half* a, int64_t len,
    double sums[kSweepSums]) {
  widened_sweep_sums<c10::Half>(s0, s1, s2, a, len, sums);
}

void sweep_block(const c10::Half* s0, const c10::Half* s1, const c10::Half* s2, const c10::Half* a, int64_t len,
                 double sums[kSweepSums]) {
  static const bool has_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (has_f16c) {
    half_sweep_block_f16c(s0, s1, s2, a, len, sums);
  } else {
    half_sweep_block_portable(s0, s1, s2, a, len, sums);
  }
}

void sweep_block(const double* s0, const double* s1, const double* s2, const double* a,
                 int64_t len, double sums[kSweepSums]) {
  // Local accumulators: `sums` may alias the inputs as far as the compiler knows, which would make
  // every add a store and a reload.
  double sa0 = 0.0, sa1 = 0.0, s10 = 0.0, sa2 = 0.0, s20 = 0.0, s21 = 0.0;
#pragma omp simd reduction(+ : sa0, sa1, s10, sa2, s20, s21)
  for (int64_t i = 0; i < len; ++i) {
    sa0 += std::fabs(s0[i] - a[i]);
    sa1 += std::fabs(s1[i] - a[i]);
    s10 += std::fabs(s1[i] - s0[i]);
    sa2 += std::fabs(s2[i] - a[i]);
    s20 += std::fabs(s2[i] - s0[i]);
    s21 += std::fabs(s2[i] - s1[i]);
  }
  sums[0] += sa0;
  sums[1] += sa1;
  sums[2] += s10;
  sums[3] += sa2;
  sums[4] += s20;
  sums[5] += s21;
}

// The sums of one sweep over columns [begin, end). A sweep with fewer than three slices left repeats
// its last slice: the extra sums are never read, and the repeated row is already in L1.
template <typename T>
void sweep_sums(const T* x, int64_t row_stride, int64_t s, int64_t count, int64_t anchor, int64_t begin,
                int64_t end, double sums[kSweepSums]) {
  const T* row[kSweep];
  for (int k = 0; k < kSweep; ++k) row[k] = x + (s + std::min<int64_t>(k, count - 1)) * row_stride;
  const T* xa = x + anchor * row_stride;
  for (int64_t b = begin; b < end; b += kSweepBlock) {
    const int64_t len = std::min(kSweepBlock, end - b);
    sweep_block(row[0] + b, row[1] + b, row[2] + b, xa + b, len, sums);
  }
}

// Applies the rule to the `count` slices of a sweep from its summed |differences|; returns the anchor
// leaving the sweep. Writes the outputs only when `write` (one thread of a team).
inline int64_t decide_sweep(const double sums[kSweepSums], int64_t s, int64_t count, int64_t anchor,
                            double inv_cols, double gamma, bool write, bool* keep, float* dist) {
  int local = 0;  // position of the current anchor in (a, s0, s1, s2)
  for (int k = 0; k < count; ++k) {
    const double d = sums[k * (k + 1) / 2 + local] * inv_cols;
    const bool kept = d > gamma;
    if (write) {
      dist[s + k] = static_cast<float>(d);
      keep[s + k] = kept;
    }
    if (kept) local = k + 1;
  }
  return local == 0 ? anchor : s + local - 1;
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
  const double inv_cols = 1.0 / static_cast<double>(cols);
  int64_t anchor = start;
  for (int64_t s = start + 1; s < end; s += kSweep) {
    const int64_t count = std::min<int64_t>(kSweep, end - s);
    double sums[kSweepSums] = {};
    sweep_sums(x, row_stride, s, count, anchor, 0, cols, sums);
    anchor = decide_sweep(sums, s, count, anchor, inv_cols, gamma, true, keep, dist);
  }
}

// One volume on all threads: a single parallel region for the whole scan (not one per slice), each
// thread owning the same column range of every slice, so its part of the anchor stays in its own
// cache. Per sweep the threads publish partial sums, meet at one barrier (the partials are double
// buffered, so a thread may start the next sweep while others still read this one), and every thread
// derives the same decisions from the partials summed in thread order.
template <typename T>
void scan_segment_parallel(const T* x, int64_t row_stride, int64_t cols, int64_t start, int64_t end,
                           double gamma, bool* keep, float* dist) {
  if (end <= start) return;
  keep[start] = true;
  dist[start] = 0.f;
  // One cache line per thread's partials, so the threads never write the same line.
  struct alignas(64) Partials {
    double sums[8];
  };
  static_assert(kSweepSums <= 8, "a thread's partials must fit its cache line");
  const int threads = omp_get_max_threads();
  std::vector<Partials> partial(2 * static_cast<size_t>(threads));
  const int64_t blocks = (cols + kSweepBlock - 1) / kSweepBlock;
  const double inv_cols = 1.0 / static_cast<double>(cols);
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
    const int team = omp_get_num_threads();
    const int64_t first = std::min(cols, blocks * thread / team * kSweepBlock);
    const int64_t last = std::min(cols, blocks * (thread + 1) / team * kSweepBlock);
    int64_t anchor = start;
    int64_t sweep = 0;
    for (int64_t s = start + 1; s < end; s += kSweep, ++sweep) {
      const int64_t count = std::min<int64_t>(kSweep, end - s);
      Partials* slot = partial.data() + (sweep & 1) * threads;
      double* mine = slot[thread].sums;
      for (int k = 0; k < kSweepSums; ++k) mine[k] = 0.0;
      sweep_sums(x, row_stride, s, count, anchor, first, last, mine);
#pragma omp barrier
      double sums[kSweepSums] = {};
      for (int t = 0; t < team; ++t)
        for (int k = 0; k < kSweepSums; ++k) sums[k] += slot[t].sums[k];
      anchor = decide_sweep(sums, s, count, anchor, inv_cols, gamma, thread == 0, keep, dist);
    }
  }
}

template <typename T>
void iaf_impl(const at::Tensor& slices, const int32_t* cu, int64_t segments, double gamma, bool* keep,
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
void anchor_distance_impl(const at::Tensor& slices, const int64_t* anchor, float* dist) {
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





std::tuple<at::Tensor, at::Tensor> iaf_select_cpu(const at::Tensor& slices,
                                                       const std::optional<at::Tensor>& cu_seqlens,
                                                       int64_t seqlen, double gamma) {
  check_slices(slices);
  const int64_t rows = slices.size(0);
  const std::vector<int32_t> cu = segment_offsets(cu_seqlens, seqlen, rows);
  const int64_t segments = static_cast<int64_t>(cu.size()) - 1;
  // Every row is written by the scan of its segment; zero-filling first would be a second pass over
  // the outputs, each a torch op whose code is cold after the volume has streamed through the caches.
  auto keep = at::empty({rows}, slices.options().dtype(at::kBool));
  auto dist = at::empty({rows}, slices.options().dtype(at::kFloat));
  dispatch_volume_dtype(slices.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    iaf_impl<T>(slices, cu.data(), segments, gamma, keep.data_ptr<bool>(), dist.data_ptr<float>());
  });
  std::vector<int64_t> lone_rows;
  for (int64_t b = 0; b < segments; ++b)
    if (cu[b + 1] - cu[b] == 1) lone_rows.push_back(cu[b]);
  check_finite("iaf_select", slices, dist.data_ptr<float>(), lone_rows);
  return {keep, dist};
}

at::Tensor anchor_distances_cpu(const at::Tensor& slices, const at::Tensor& anchor) {
  check_slices(slices);
  TORCH_CHECK(anchor.scalar_type() == at::kLong && anchor.is_contiguous() && anchor.numel() == slices.size(0),
              "anchor must be int64 [rows]");
  const int64_t* anchor_rows = anchor.data_ptr<int64_t>();
  for (int64_t s = 0; s < slices.size(0); ++s)
    TORCH_CHECK(anchor_rows[s] >= 0 && anchor_rows[s] <= s, "anchor[", s, "] must be a row in [0, ", s, "]");
  auto dist = at::zeros({slices.size(0)}, slices.options().dtype(at::kFloat));
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
  m.def("iaf_select", &iaf_select_cpu,
        "IAF keep mask and anchor distances over [rows, cols] slices; volumes at cu_seqlens, or of seqlen "
        "rows each when cu_seqlens is None",
        pybind11::arg("slices"), pybind11::arg("cu_seqlens"), pybind11::arg("seqlen"), pybind11::arg("gamma"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("anchor_distances", &anchor_distances_cpu, "mean |x[s] - x[anchor[s]]| per row",
        pybind11::arg("slices"), pybind11::arg("anchor"), pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace

MEDPRUNER_REGISTER_BINDINGS(bind_iaf);

}  // namespace medpruner
