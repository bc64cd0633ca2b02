// Helpers shared by the CPU kernels that read volumes (iaf.cpp, iaf_local.cpp): exact widening of
// every volume dtype to float, the dtype dispatch, the slice-layout and segment checks, and the NaN/Inf
// check folded into the distances.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "registry.h"

namespace medpruner {

inline float float_from_bits(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

// Half and bfloat16 widen from their bit patterns, exactly, with integer and float ops that vectorise
// in the sweep loops. c10's half conversion is a per-element call without F16C (the baseline build),
// which made float16 volumes 15x slower than one read of the volume (2.7x slower than the eager loop).
template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 v) {
  return float_from_bits(static_cast<uint32_t>(v.x) << 16);
}

template <>
inline float to_float<c10::Half>(c10::Half v) {
  const uint32_t sign = (static_cast<uint32_t>(v.x) & 0x8000u) << 16;
  // Exponent and mantissa at the top of a word, the sign shifted out.
  const uint32_t magnitude = static_cast<uint32_t>(v.x) << 17;
  // Normal numbers, Inf and NaN: move the 5-bit exponent and the mantissa into float position, add
  // 224 to the exponent field (Inf/NaN reach 255) and scale by 2^-112: a net exponent bias of +112.
  const float normal = float_from_bits((magnitude >> 4) + (224u << 23)) * 0x1p-112f;
  // Subnormals, m * 2^-24: the float 0.5 * (1 + m * 2^-23) minus 0.5.
  const float subnormal = float_from_bits((magnitude >> 17) | (126u << 23)) - 0.5f;
  // A select by mask, not a branch, so the loop around it stays vectorisable.
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(magnitude < (1u << 27));
  const uint32_t bits = (bits_of(subnormal) & is_subnormal) | (bits_of(normal) & ~is_subnormal);
  return float_from_bits(sign | bits);
}

inline void check_slices(const at::Tensor& slices) {
  TORCH_CHECK(slices.device().is_cpu(), "slices must be a CPU tensor");
  TORCH_CHECK(slices.dim() == 2, "slices must be [rows, cols]");
  // A single column has no column stride to speak of (a transposed [1, D] volume has stride D there).
  TORCH_CHECK(slices.size(0) == 0 || slices.size(1) <= 1 || slices.stride(1) == 1,
              "slices must have unit column stride");
}

template <typename Fn>
inline void dispatch_volume_dtype(at::ScalarType dtype, Fn&& fn) {
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

inline void check_finite(const char* op, const at::Tensor& slices, const float* dist,
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

// Segment offsets: the given cu_seqlens, or volumes of seqlen rows each (a single volume or a
// [B, D] batch, for which the caller builds no offsets tensor). Checked here because the outputs are
// allocated uninitialised and every row must belong to exactly one segment.
inline std::vector<int32_t> segment_offsets(const std::optional<at::Tensor>& cu_seqlens, int64_t seqlen,
                                     int64_t rows) {
  std::vector<int32_t> cu;
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(cu_seqlens->device().is_cpu() && cu_seqlens->scalar_type() == at::kInt &&
                    cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 2,
                "cu_seqlens must be a CPU int32 [B+1] tensor");
    const auto offsets = cu_seqlens->contiguous();
    cu.assign(offsets.data_ptr<int32_t>(), offsets.data_ptr<int32_t>() + offsets.numel());
  } else {
    TORCH_CHECK(seqlen > 0 && rows % seqlen == 0, "seqlen must divide the rows");
    for (int64_t start = 0; start <= rows; start += seqlen) cu.push_back(static_cast<int32_t>(start));
  }
  bool ordered = cu.front() == 0 && cu.back() == rows;
  for (size_t b = 1; b < cu.size(); ++b) ordered = ordered && cu[b - 1] <= cu[b];
  TORCH_CHECK(ordered, "cu_seqlens must start at 0, be non-decreasing and end at the number of rows");
  return cu;
}

}  // namespace medpruner
