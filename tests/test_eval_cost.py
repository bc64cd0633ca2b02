"""The eval's cost model and measurements: FLOPs against counts done by hand, parameter counts against
the Linear weights of real (tiny, random) Hugging Face models of each family, the processors' resize
rule, the timer's split on a fake clock, the modelled/measured check, and the cost plot."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import tiny_gemma3, tiny_qwen2_5_vl, tiny_qwen3_vl
from medpruner.eval import cost as cost_module
from medpruner.eval.cost import PUBLISHED, ModelShape, PrefillTimer, prefill_cost, published_costs
from medpruner.eval.cost_report import cost_table, plot_cost
from medpruner.eval.summary import cost_check

SMALL = ModelShape(name="small", vis_layers=1, vis_hidden=2, vis_mlp=3, vis_mlp_mats=2, patch=1, temporal=1, merge=1,
                   window=0, full_blocks=0, mergers=1, layers=1, hidden=5, mlp=7, heads=1, kv_heads=1, head_dim=5,
                   vocab=11, min_pixels=1, max_pixels=10**6)


def test_flops_by_hand():
    # tower, 4 patches of width 2: embed 2*4*3*2 = 48; block 2*4*(4*4 + 2*2*3) = 224 + attention 4*4*4*2 = 128;
    # merger (4 tokens, width 2 -> 5): 2*4*(2*2 + 2*5) = 112
    assert SMALL.tower_flops(4) == 48 + 224 + 128 + 112
    # LLM, 3 tokens: dense 2*3*(5*15 + 25 + 3*5*7) = 1230; causal attention 4*5*(3*4/2) = 120; LM head 2*5*11
    assert SMALL.prefill_flops(3) == 1230 + 120 + 110
    windowed = ModelShape(**{**SMALL.__dict__, "sliding": 2, "sliding_layers": 1})
    # the one layer attends at most 2 keys: 1 + 2 + 2 = 5 pairs instead of 6
    assert windowed.prefill_flops(3) == 1230 + 4 * 5 * 5 + 110


@pytest.mark.parametrize("key, size, grid", [
    ("qwen3-vl-8b", (256, 256), (16, 16)),
    ("qwen3-vl-8b", (64, 64), (16, 16)),       # below min_pixels (256^2): scaled up
    ("qwen3-vl-8b", (300, 200), (20, 14)),     # 288 x 192 < 256^2 -> x1.045, each side up to a multiple of 32
    ("qwen2.5-vl-7b", (256, 256), (18, 18)),   # 252 = 9 x 28
    ("medgemma-4b", (512, 300), (64, 64)),     # always 896 x 896
])
def test_slice_grid_follows_the_processors(key, size, grid):
    assert PUBLISHED[key].slice_grid(*size) == grid


@pytest.mark.parametrize("build", [tiny_qwen3_vl, tiny_qwen2_5_vl, tiny_gemma3])
def test_parameter_counts_match_the_models_linear_weights(build):
    model = build()
    shape = ModelShape.from_config(model.config)
    text = model.model.language_model
    linear = sum(m.weight.numel() for m in text.modules() if isinstance(m, torch.nn.Linear))
    assert shape.llm_params() == linear + model.lm_head.weight.numel()
    tower = cost_module.tower_module(model)
    # SigLIP's pooling head (built when the config asks for it) is not used by Gemma3: its tokens are the
    # last hidden states, pooled
    weights = sum(m.weight.numel() for name, m in tower.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)) and ".head." not in f".{name}")
    if hasattr(model.model, "multi_modal_projector"):  # Gemma3's projector is a parameter matrix
        weights += model.model.multi_modal_projector.mm_input_projection_weight.numel()
    assert shape.tower_params() == weights


def test_published_costs_follow_the_selection():
    full = {"slices_total": 40, "slices_kept": 40, "slices_encoded": 40, "tokens_total": 160, "tokens_kept": 160}
    pruned = {**full, "slices_kept": 10, "slices_encoded": 10, "tokens_kept": 30}
    token_only = {**full, "tokens_kept": 30}
    costs = [published_costs(r, (80, 256, 256), 30) for r in (full, pruned, token_only)]
    for key in PUBLISHED:
        assert costs[1][key]["ms"] < costs[2][key]["ms"] < costs[0][key]["ms"]
        # the volume has 80 slices though 40 were run: counts scale to the volume's size
        assert costs[0][key]["patches_encoded"] == 80 * PUBLISHED[key].slice_grid(256, 256)[0] ** 2
    q3 = costs[0]["qwen3-vl-8b"]
    assert q3["llm_tokens"] == 80 * 64 + 30 + 2 * 80
    one = prefill_cost(PUBLISHED["qwen3-vl-8b"], slices=1, height=256, width=256, slices_encoded=0,
                       visual_fraction=0.0, slices_kept=0, text_tokens=1)
    # one token is memory bound: the LLM's bf16 weights at 3.35 TB/s
    assert one["ms"] == pytest.approx(1e3 * 2 * PUBLISHED["qwen3-vl-8b"].llm_params() / 3.35e12)


def test_timer_splits_tower_pruning_and_prefill(monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 4.0, 5.0, 6.0, 10.0, 11.0])
    monkeypatch.setattr(cost_module.time, "perf_counter", lambda: next(clock))
    tower = torch.nn.Identity()
    timer = PrefillTimer(tower)
    timer.start()                        # 0
    tower(torch.zeros(1))                # 1 -> 3: every slice, before the hand-over
    timer.put(None)                      # 4: the pruned prompt reaches the LLM
    tower(torch.zeros(1))                # 5 -> 6: inside the prefill (an unpruned model encodes there)
    timer.put(None)                      # 10: the first token
    timer.put(None)                      # 11: ignored
    assert timer.split() == {"tower": 3.0, "pruning": 2.0, "llm_prefill": 5.0}
    timer.close()
    tower(torch.zeros(1))
    assert len(timer.tower_calls) == 2  # the hooks are gone


def _record(sample, method, flops, tower, prefill, pruning=0.0):
    return {"sample_id": sample, "method": method, "modelled_flops": flops,
            "seconds_split": {"tower": tower, "llm_prefill": prefill, "pruning": pruning}}


def test_cost_check_uses_per_sample_medians():
    by_method = {
        "none": [_record(s, "none", 100.0, 1.0, 1.0) for s in "abc"],
        "fast": [_record("a", "fast", 25.0, 0.2, 0.3), _record("b", "fast", 25.0, 0.25, 0.25),
                 _record("c", "fast", 25.0, 9.0, 9.0)],  # a busy neighbour
        "slow": [_record(s, "slow", 50.0, 0.9, 0.9) for s in "abc"],
    }
    check = cost_check(by_method, ["none", "fast", "slow"])["methods"]
    assert check["fast"]["modelled_ratio"] == 0.25 and check["fast"]["measured_ratio"] == 0.25
    assert check["fast"]["agrees"] is True
    assert check["slow"]["measured_ratio"] == pytest.approx(0.9) and check["slow"]["agrees"] is False
    assert "none" not in check


def test_cost_plot_and_table(tmp_path):
    def entry(mean, ms, seconds):
        return {"primary_metric": "accuracy",
                "metrics": {"overall": {"accuracy": {"mean": mean, "ci_low": mean - 0.1, "ci_high": mean + 0.1,
                                                     "n": 10}}},
                "cost": {"slices_encoded": 5.0, "visual_tokens": 20.0,
                         "seconds_median": {"tower": 0.1, "pruning": 0.0, "llm_prefill": 0.1, "total": seconds},
                         "modelled": {key: {"ms": ms} for key in PUBLISHED}}}

    summary = {"methods": {"none": entry(0.8, 40.0, 0.3), "medpruner": entry(0.78, 10.0, 0.1),
                           "iaf": entry(0.78, 10.0, 0.12), "topk": entry(0.7, 17.0, 0.2)}}
    rows = {row["method"]: row for row in cost_table(summary)}
    assert rows["medpruner"]["pareto_modelled"] and rows["none"]["pareto_modelled"]
    assert not rows["topk"]["pareto_modelled"] and not rows["iaf"]["pareto_measured"]
    assert rows["iaf"]["pareto_modelled"]  # equal cost and score: neither dominates the other
    path = plot_cost(summary, tmp_path)
    assert path.name == "cost.png" and path.read_bytes()[:4] == b"\x89PNG"
    json.dumps(rows)
