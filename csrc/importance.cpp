// attention_importance on CPU: the attention each key receives, per segment, head mean, query sum.
//
// One task per (segment, head): for a block of kQueryBlock queries at a time it computes the block's
// full score rows (kQueryBlock x segment length, the only scratch: O(block * N)), an exact row
// softmax, and adds the block's column sums to the task's own [length] accumulator. Tasks never share
// an output, and the final head mean adds the heads in a fixed order, so the result does not depend
// on the thread count or schedule. Scores are formed in register tiles with the key matrix transposed
// ([H, Dh, N]), so the innermost loops run over keys with unit stride and vectorise without -ffast-math.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "registry.h"

namespace medpruner {
namespace {

constexpr int64_t kQueryBlock = 32;
// A score tile of kTileRows queries x kTileCols keys stays in registers across the Dh loop (8 AVX2
// or 16 SSE registers): each key load feeds kTileRows FMAs instead of a load and store of the score.
constexpr int64_t kTileRows = 4;
constexpr int64_t kTileCols = 16;
constexpr int64_t kLanes = 16;

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
// The extension is built for baseline x86-64 (SSE2, no FMA) so that it runs anywhere; an AVX2+FMA
// clone of the hot loops, picked once at load time, is 2-3x faster where the CPU has it.
#define MEDPRUNER_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MEDPRUNER_SIMD_CLONES
#endif

// exp(x) for x <= 0 (softmax arguments), vectorisable: 2^n * P(r) with |r| <= ln2/2 and a degree-6
// Taylor polynomial (relative error ~2e-7, far below float32 accumulation error over a segment).
// std::exp is a scalar libm call without -ffast-math, and it dominates the run time otherwise.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  // Round to nearest through the 1.5 * 2^23 shift: SSE2 has no vector round, and this stays vectorisable.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// GCC/Clang vector extension: 8 floats, one AVX register or two SSE ones. Spelled out because the
// auto-vectoriser spills a 2-D accumulator array instead of keeping it in registers.
typedef float Float8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));
static_assert(kTileRows == 4 && kTileCols == 16, "score_tile holds a 4 x (2 x 8) accumulator");

// scores[r * ld + j] = sum_d q[r * head_dim + d] * panel[d * kTileCols + j] for a full tile.
MEDPRUNER_SIMD_CLONES
void score_tile(const float* q, const float* panel, int64_t head_dim, float* scores, int64_t ld) {
  Float8 a00{}, a01{}, a10{}, a11{}, a20{}, a21{}, a30{}, a31{};
  const float *q0 = q, *q1 = q + head_dim, *q2 = q + 2 * head_dim, *q3 = q + 3 * head_dim;
  for (int64_t d = 0; d < head_dim; ++d) {
    Float8 k0, k1;
    std::memcpy(&k0, panel + d * kTileCols, sizeof(k0));
    std::memcpy(&k1, panel + d * kTileCols + 8, sizeof(k1));
    const Float8 b0 = Float8{} + q0[d], b1 = Float8{} + q1[d], b2 = Float8{} + q2[d], b3 = Float8{} + q3[d];
    a00 += b0 * k0;
    a01 += b0 * k1;
    a10 += b1 * k0;
    a11 += b1 * k1;
    a20 += b2 * k0;
    a21 += b2 * k1;
    a30 += b3 * k0;
    a31 += b3 * k1;
  }
  std::memcpy(scores, &a00, sizeof(a00));
  std::memcpy(scores + 8, &a01, sizeof(a01));
  std::memcpy(scores + ld, &a10, sizeof(a10));
  std::memcpy(scores + ld + 8, &a11, sizeof(a11));
  std::memcpy(scores + 2 * ld, &a20, sizeof(a20));
  std::memcpy(scores + 2 * ld + 8, &a21, sizeof(a21));
  std::memcpy(scores + 3 * ld, &a30, sizeof(a30));
  std::memcpy(scores + 3 * ld + 8, &a31, sizeof(a31));
}

// One row: exact softmax in place, then received += probabilities. Max and sum run over kLanes
// partial results in a fixed order, which vectorises without letting the compiler reassociate.
MEDPRUNER_SIMD_CLONES
void softmax_accumulate(float* s, int64_t length, float* received) {
  float lane[kLanes];
  std::fill(lane, lane + kLanes, -std::numeric_limits<float>::infinity());
  const int64_t full = length - length % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] = s[j + l] > lane[l] ? s[j + l] : lane[l];
  }
  float row_max = -std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < kLanes; ++l) row_max = std::max(row_max, lane[l]);
  for (int64_t j = full; j < length; ++j) row_max = std::max(row_max, s[j]);
  // exp_nonpositive on 8 lanes at once, the same operations in the same order as the scalar tail.
  const int64_t full8 = length - length % 8;
  for (int64_t j = 0; j < full8; j += 8) {
    Float8 x;
    std::memcpy(&x, s + j, sizeof(x));
    x = x - row_max;
    x = x > -87.0f ? x : Float8{} - 87.0f;
    const Float8 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const Float8 r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
    Float8 p = Float8{} + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const Int8 bits = (__builtin_convertvector(n, Int8) + 127) << 23;
    Float8 scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    p = p * scale;
    std::memcpy(s + j, &p, sizeof(p));
  }
  for (int64_t j = full8; j < length; ++j) s[j] = exp_nonpositive(s[j] - row_max);
  std::fill(lane, lane + kLanes, 0.0f);
  for (int64_t j = 0; j < full; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lane[l] += s[j + l];
  }
  float row_sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) row_sum += lane[l];
  for (int64_t j = full; j < length; ++j) row_sum += s[j];
  const float inv = 1.0f / row_sum;
  for (int64_t j = 0; j < length; ++j) received[j] += s[j] * inv;
}

// q_head: [N, Dh] of one head; kt_head: [Dh, N] of the same head. The segment's keys are repacked as
// zero-padded [tile][Dh][kTileCols] panels: a tile then streams one contiguous panel, where reading
// [Dh, N] at stride N (often a power of two) would thrash a few L1 sets. Queries past the segment are
// zero rows of the scaled copy, so every tile is full; padded key columns are never read back.
void segment_head_task(const float* q_head, const float* kt_head, int64_t num_tokens, int64_t head_dim,
                       int64_t start, int64_t length, float scale, std::vector<float>& queries,
                       std::vector<float>& panels, std::vector<float>& scores, float* received) {
  const int64_t tiles = (length + kTileCols - 1) / kTileCols;
  const int64_t width = tiles * kTileCols;
  panels.assign(static_cast<size_t>(width * head_dim), 0.0f);
  for (int64_t d = 0; d < head_dim; ++d) {
    const float* kd = kt_head + d * num_tokens + start;
    for (int64_t j = 0; j < length; ++j) {
      panels[(j / kTileCols) * head_dim * kTileCols + d * kTileCols + j % kTileCols] = kd[j];
    }
  }
  queries.resize(static_cast<size_t>(kQueryBlock * head_dim));
  scores.resize(static_cast<size_t>(kQueryBlock * width));
  std::fill(received, received + length, 0.0f);
  for (int64_t q0 = 0; q0 < length; q0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, length - q0);
    const int64_t padded = (rows + kTileRows - 1) / kTileRows * kTileRows;
    for (int64_t i = 0; i < rows; ++i) {
      const float* qi = q_head + (start + q0 + i) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) queries[i * head_dim + d] = qi[d] * scale;
    }
    std::fill(queries.begin() + rows * head_dim, queries.begin() + padded * head_dim, 0.0f);
    for (int64_t r0 = 0; r0 < padded; r0 += kTileRows) {
      for (int64_t t = 0; t < tiles; ++t) {
        score_tile(queries.data() + r0 * head_dim, panels.data() + t * head_dim * kTileCols, head_dim,
                   scores.data() + r0 * width + t * kTileCols, width);
      }
    }
    for (int64_t i = 0; i < rows; ++i) softmax_accumulate(scores.data() + i * width, length, received);
  }
}

}  // namespace

// q, k: [N, H, Dh] float32/float16/bfloat16, any strides; cu_seqlens: int32 [B+1] (CPU).
// Returns float32 [N]: per key, the softmax attention received, averaged over heads and summed over
// its segment's queries.
at::Tensor attention_importance(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens,
                                   double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && cu_seqlens.device().is_cpu(),
              "attention_importance (cpp): CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes(), "attention_importance (cpp): q, k must be [N, H, Dh]");
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const auto q_heads = q.to(at::kFloat).permute({1, 0, 2}).contiguous();  // [H, N, Dh]
  const auto k_t = k.to(at::kFloat).permute({1, 2, 0}).contiguous();      // [H, Dh, N]
  const auto cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* offsets = cu.data_ptr<int64_t>();
  const int64_t num_segments = cu.numel() - 1;

  std::vector<std::pair<int64_t, int64_t>> tasks;  // (segment, head)
  for (int64_t b = 0; b < num_segments; ++b) {
    if (offsets[b + 1] > offsets[b]) {
      for (int64_t h = 0; h < num_heads; ++h) tasks.emplace_back(b, h);
    }
  }
  auto per_head = at::empty({num_heads, num_tokens}, at::kFloat);
  const float* q_ptr = q_heads.data_ptr<float>();
  const float* kt_ptr = k_t.data_ptr<float>();
  float* per_head_ptr = per_head.data_ptr<float>();
  const float scale_f = static_cast<float>(scale);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());

#pragma omp parallel
  {
    std::vector<float> queries, panels, scores;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const auto [b, h] = tasks[static_cast<size_t>(t)];
      const int64_t start = offsets[b], length = offsets[b + 1] - offsets[b];
      segment_head_task(q_ptr + h * num_tokens * head_dim, kt_ptr + h * head_dim * num_tokens, num_tokens,
                        head_dim, start, length, scale_f, queries, panels, scores, per_head_ptr + h * num_tokens + start);
    }
  }

  auto out = at::zeros({num_tokens}, at::kFloat);
  float* out_ptr = out.data_ptr<float>();
  const float inv_heads = 1.0f / static_cast<float>(num_heads);
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < num_tokens; ++j) {
    float total = 0.0f;
    for (int64_t h = 0; h < num_heads; ++h) total += per_head_ptr[h * num_tokens + j];
    out_ptr[j] = total * inv_heads;
  }
  return out;
}

static void bind_importance(pybind11::module_& m) {
  m.def("attention_importance", &attention_importance, pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("cu_seqlens"), pybind11::arg("scale"),
        "Per-key received softmax attention, head mean, segment query sum (float32 [N])");
}

MEDPRUNER_REGISTER_BINDINGS(bind_importance);

}  // namespace medpruner
