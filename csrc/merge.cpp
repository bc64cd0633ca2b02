// merge_tokens on CPU: contextual merge of each segment's unkept tokens into a few target tokens.
//
// Three phases, each deterministic whatever the thread count:
//   1. sequential O(N) scan: per segment the unkept tokens R, the targets (stride over R) and members;
//   2. parallel over members: argmax over their segment's targets of the cosine similarity (double
//      dot products of keys divided by their norms, as torch's normalize does, so decisions match a
//      float64 reference except on sub-1e-12 near-ties, and ties that are exact there stay exact);
//   3. a stable counting sort of members by target, then parallel over targets: each target sums its
//      own members in ascending order (double) and writes its own row.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "registry.h"

namespace medpruner {

// x: [N, D] float (any float dtype, any strides); keys: [N, Dk] float; keep: bool [N];
// cu_seqlens: int [B+1]; num_targets: optional int64 [B], per segment the target count C replacing
// max(int(context_frac * n), 1) (C = 0: no merge). Returns (x_out float32 [N, D], keep_out bool [N]).
std::tuple<at::Tensor, at::Tensor> merge_tokens(const at::Tensor& x, const at::Tensor& keys,
                                                      const at::Tensor& keep, const at::Tensor& cu_seqlens,
                                                      double context_frac,
                                                      const std::optional<at::Tensor>& num_targets) {
  TORCH_CHECK(x.device().is_cpu() && keys.device().is_cpu() && keep.device().is_cpu() &&
                  cu_seqlens.device().is_cpu(),
              "merge_tokens (cpp): CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && keys.dim() == 2 && keep.dim() == 1 && keys.size(0) == x.size(0) &&
                  keep.size(0) == x.size(0),
              "merge_tokens (cpp): x [N, D], keys [N, Dk], keep [N]");
  const int64_t feat_dim = x.size(1), key_dim = keys.size(1);
  const auto x32 = x.to(at::kFloat).contiguous();
  const auto keys64 = keys.to(at::kDouble).contiguous();
  const auto keep_c = keep.to(at::kBool).contiguous();
  const auto cu = cu_seqlens.to(at::kLong).contiguous();
  auto x_out = x32.clone();
  auto keep_out = keep_c.clone();

  const float* xs = x32.data_ptr<float>();
  const double* ks = keys64.data_ptr<double>();
  const bool* kept = keep_c.data_ptr<bool>();
  const int64_t* offsets = cu.data_ptr<int64_t>();
  float* out = x_out.data_ptr<float>();
  bool* keep_out_ptr = keep_out.data_ptr<bool>();
  const int64_t num_segments = cu.numel() - 1;
  const int64_t* given_targets = nullptr;
  if (num_targets.has_value()) {
    TORCH_CHECK(num_targets->device().is_cpu() && num_targets->scalar_type() == at::kLong &&
                    num_targets->is_contiguous() && num_targets->numel() == num_segments,
                "merge_tokens (cpp): num_targets must be contiguous int64 [B]");
    given_targets = num_targets->data_ptr<int64_t>();
  }

  // Phase 1. Targets of all segments are numbered globally; a segment's targets are contiguous.
  std::vector<int64_t> target_tok, member_tok, member_first_target, member_num_targets;
  for (int64_t b = 0; b < num_segments; ++b) {
    const int64_t start = offsets[b], n = offsets[b + 1] - offsets[b];
    std::vector<int64_t> rest;
    for (int64_t t = start; t < start + n; ++t) {
      if (!kept[t]) rest.push_back(t);
    }
    if (rest.empty()) continue;
    const int64_t num_rest = static_cast<int64_t>(rest.size());
    const int64_t capacity =
        given_targets ? given_targets[b]
                      : std::max<int64_t>(static_cast<int64_t>(context_frac * static_cast<double>(n)), 1);
    if (capacity <= 0) continue;  // no targets: nothing merges, the segment passes through
    const int64_t stride = std::max<int64_t>(num_rest / capacity, 1);
    const int64_t num_targets = std::min(capacity, (num_rest + stride - 1) / stride);
    const int64_t first_target = static_cast<int64_t>(target_tok.size());
    for (int64_t r = 0; r < num_rest; ++r) {
      if (r % stride == 0 && r / stride < num_targets) {
        target_tok.push_back(rest[r]);
        keep_out_ptr[rest[r]] = true;
      } else {
        member_tok.push_back(rest[r]);
        member_first_target.push_back(first_target);
        member_num_targets.push_back(num_targets);
      }
    }
  }
  const int64_t total_targets = static_cast<int64_t>(target_tok.size());
  const int64_t total_members = static_cast<int64_t>(member_tok.size());

  // Dividing (not multiplying by an inverse norm) keeps keys that are exact multiples of each other
  // exact ties, which the earlier target must then win.
  auto unit_keys = at::zeros({x.size(0), key_dim}, at::kDouble);
  double* unit = unit_keys.data_ptr<double>();
  auto normalise = [&](int64_t t) {
    const double* kt = ks + t * key_dim;
    double sq = 0.0;
    for (int64_t c = 0; c < key_dim; ++c) sq += kt[c] * kt[c];
    const double norm = std::max(std::sqrt(sq), 1e-12);
    for (int64_t c = 0; c < key_dim; ++c) unit[t * key_dim + c] = kt[c] / norm;
  };
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < total_targets; ++i) normalise(target_tok[i]);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < total_members; ++i) normalise(member_tok[i]);

  // Phase 2.
  std::vector<int64_t> owner(static_cast<size_t>(total_members));
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t i = 0; i < total_members; ++i) {
    const double* km = unit + member_tok[i] * key_dim;
    double best = -INFINITY;
    int64_t best_target = member_first_target[i];
    for (int64_t j = 0; j < member_num_targets[i]; ++j) {
      const int64_t target = member_first_target[i] + j;
      const double* kt = unit + target_tok[target] * key_dim;
      double sim = 0.0;
      for (int64_t c = 0; c < key_dim; ++c) sim += km[c] * kt[c];
      if (sim > best) {  // strict: the earlier target keeps a tie
        best = sim;
        best_target = target;
      }
    }
    owner[i] = best_target;
  }

  // Phase 3.
  std::vector<int64_t> bucket_start(static_cast<size_t>(total_targets + 1), 0);
  for (int64_t i = 0; i < total_members; ++i) ++bucket_start[owner[i] + 1];
  for (int64_t t = 0; t < total_targets; ++t) bucket_start[t + 1] += bucket_start[t];
  std::vector<int64_t> sorted_members(static_cast<size_t>(total_members));
  {
    std::vector<int64_t> fill(bucket_start.begin(), bucket_start.end() - 1);
    for (int64_t i = 0; i < total_members; ++i) sorted_members[fill[owner[i]]++] = member_tok[i];
  }
#pragma omp parallel
  {
    std::vector<double> sum(static_cast<size_t>(feat_dim));
#pragma omp for schedule(dynamic, 4)
    for (int64_t t = 0; t < total_targets; ++t) {
      const int64_t begin = bucket_start[t], end = bucket_start[t + 1];
      if (end == begin) continue;
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int64_t i = begin; i < end; ++i) {
        const float* row = xs + sorted_members[i] * feat_dim;
        for (int64_t c = 0; c < feat_dim; ++c) sum[c] += row[c];
      }
      const double inv_count = 1.0 / static_cast<double>(end - begin);
      const int64_t tok = target_tok[t];
      for (int64_t c = 0; c < feat_dim; ++c) {
        out[tok * feat_dim + c] = static_cast<float>(static_cast<double>(xs[tok * feat_dim + c]) + sum[c] * inv_count);
      }
    }
  }
  return {x_out, keep_out};
}

static void bind_merge(pybind11::module_& m) {
  m.def("merge_tokens", &merge_tokens, pybind11::arg("x"), pybind11::arg("keys"), pybind11::arg("keep"),
        pybind11::arg("cu_seqlens"), pybind11::arg("context_frac"), pybind11::arg("num_targets") = pybind11::none(),
        "Contextual merge of unkept tokens into strided targets (x_out float32, keep_out)");
}

MEDPRUNER_REGISTER_BINDINGS(bind_merge);

}  // namespace medpruner
