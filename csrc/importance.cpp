// attention_importance on CPU: the attention each key receives, per segment, head mean, query sum.
//
// One task per (segment, head): for a block of kQueryBlock queries at a time it computes the block's
// full score rows (kQueryBlock x segment length, the only scratch: O(block * N)), an exact row
// softmax, and adds the block's column sums to the task's own [length] accumulator. Tasks never share
// an output, and the final head mean adds the heads in a fixed order, so the result does not depend
// on the thread count or schedule. Scores are formed with the key matrix transposed ([H, Dh, N]) so
// the innermost loop runs over keys with unit stride and vectorises without -ffast-math.
#include <torch/extension.h>

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

void segment_head_task(const float* q_head, const float* kt_head, int64_t num_tokens, int64_t head_dim,
                       int64_t start, int64_t length, float scale, std::vector<float>& scores,
                       float* received) {
  scores.resize(static_cast<size_t>(kQueryBlock * length));
  std::fill(received, received + length, 0.0f);
  for (int64_t q0 = 0; q0 < length; q0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, length - q0);
    for (int64_t i = 0; i < rows; ++i) {
      float* s = scores.data() + i * length;
      std::fill(s, s + length, 0.0f);
      const float* qi = q_head + (start + q0 + i) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        const float qd = qi[d] * scale;
        const float* kd = kt_head + d * num_tokens + start;
        for (int64_t j = 0; j < length; ++j) s[j] += qd * kd[j];
      }
      float row_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < length; ++j) row_max = std::max(row_max, s[j]);
      float row_sum = 0.0f;
      for (int64_t j = 0; j < length; ++j) {
        s[j] = exp_nonpositive(s[j] - row_max);
        row_sum += s[j];
      }
      const float inv = 1.0f / row_sum;
      for (int64_t j = 0; j < length; ++j) received[j] += s[j] * inv;
    }
  }
}

}  // namespace

// q, k: [N, H, Dh] float32/float16/bfloat16, any strides; cu_seqlens: int32 [B+1] (CPU).
// Returns float32 [N]: per key, the softmax attention received, averaged over heads and summed over
// its segment's queries.
torch::Tensor attention_importance(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& cu_seqlens,
                                   double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && cu_seqlens.device().is_cpu(),
              "attention_importance (cpp): CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes(), "attention_importance (cpp): q, k must be [N, H, Dh]");
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const auto q_heads = q.to(torch::kFloat32).permute({1, 0, 2}).contiguous();  // [H, N, Dh]
  const auto k_t = k.to(torch::kFloat32).permute({1, 2, 0}).contiguous();      // [H, Dh, N]
  const auto cu = cu_seqlens.to(torch::kInt64).contiguous();
  const int64_t* offsets = cu.data_ptr<int64_t>();
  const int64_t num_segments = cu.numel() - 1;

  std::vector<std::pair<int64_t, int64_t>> tasks;  // (segment, head)
  for (int64_t b = 0; b < num_segments; ++b) {
    if (offsets[b + 1] > offsets[b]) {
      for (int64_t h = 0; h < num_heads; ++h) tasks.emplace_back(b, h);
    }
  }
  auto per_head = torch::empty({num_heads, num_tokens}, torch::kFloat32);
  const float* q_ptr = q_heads.data_ptr<float>();
  const float* kt_ptr = k_t.data_ptr<float>();
  float* per_head_ptr = per_head.data_ptr<float>();
  const float scale_f = static_cast<float>(scale);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());

#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const auto [b, h] = tasks[static_cast<size_t>(t)];
      const int64_t start = offsets[b], length = offsets[b + 1] - offsets[b];
      segment_head_task(q_ptr + h * num_tokens * head_dim, kt_ptr + h * head_dim * num_tokens, num_tokens,
                        head_dim, start, length, scale_f, scores, per_head_ptr + h * num_tokens + start);
    }
  }

  auto out = torch::zeros({num_tokens}, torch::kFloat32);
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
