"""Host reads per request: every device value the pipeline reads goes through ``host_read``; paper mode
reads once, fast mode with a budget once, adaptive fast mode twice, for one volume and for a batch, on
every family. Deferred kernel checks surface at the last read (a NaN volume raises a ValueError)."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from _tiny_models import (  # noqa: E402
    gemma_processor,
    gemma_volume_inputs,
    qwen_processor,
    qwen_volume_inputs,
    synthetic_volume,
    tiny_gemma3,
    tiny_qwen2_5_vl,
    tiny_qwen3_vl,
)
from medpruner import apply_medpruner, remove_medpruner  # noqa: E402
from medpruner.adapters import base  # noqa: E402

from medpruner_kernels import _validation  # noqa: E402

BACKEND = "torch"
FAMILIES = {
    "qwen3_vl": (tiny_qwen3_vl, functools.partial(qwen_processor, "qwen3_vl"), qwen_volume_inputs),
    "qwen2_5_vl": (
        tiny_qwen2_5_vl,
        functools.partial(qwen_processor, "qwen2_5_vl", clip_norm=True),
        qwen_volume_inputs,
    ),
    "gemma3": (tiny_gemma3, gemma_processor, gemma_volume_inputs),
}
EXPECTED_READS = {("paper", None): 1, ("paper", 8): 1, ("fast", 8): 1, ("fast", None): 2}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, processor, volume_inputs = FAMILIES[request.param]
    model = build()
    yield model, functools.partial(volume_inputs, processor())
    remove_medpruner(model)


@pytest.fixture
def reads(monkeypatch):
    calls = []
    original = base.host_read

    def counting(*tensors, last=False):
        calls.append(last)
        return original(*tensors, last=last)

    monkeypatch.setattr(base, "host_read", counting)
    return calls


@pytest.mark.parametrize("mode, budget", list(EXPECTED_READS))
@pytest.mark.parametrize("volumes", [1, 3])
def test_reads_per_request(family, reads, mode, budget, volumes):
    model, volume_inputs = family
    inputs = volume_inputs([synthetic_volume(6 - v, seed=v) for v in range(volumes)])
    apply_medpruner(model, mode=mode, budget=budget, tau=0.6, backend=BACKEND)
    with torch.no_grad():
        model(**inputs)
    assert len(reads) == EXPECTED_READS[(mode, budget)]
    assert reads[-1] is True and not any(reads[:-1])
    assert sum(model.medpruner_stats.slices_kept) < sum(model.medpruner_stats.slices_total)
    if volumes == 1:
        return
    reads.clear()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(reads) == EXPECTED_READS[(mode, budget)]


@pytest.mark.parametrize("mode, budget", [("fast", None), ("fast", 8), ("paper", None)])
def test_nan_volume_raises_at_the_last_read_under_deferred_checks(family, reads, mode, budget):
    model, volume_inputs = family
    inputs = volume_inputs([synthetic_volume(4, seed=1)])
    inputs["pixel_values"] = inputs["pixel_values"].clone()
    inputs["pixel_values"][inputs["pixel_values"].shape[0] // 2] = float("nan")
    apply_medpruner(model, mode=mode, budget=budget, backend=BACKEND)
    with _validation.deferred_checks(), pytest.raises(ValueError, match="NaN"), torch.no_grad():
        model(**inputs)
    assert reads and reads[-1] is True


def test_to_device_pins_only_for_cuda(monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self) or self)
    out = base.to_device([1, 2, 3], torch.device("cpu"))
    assert out.tolist() == [1, 2, 3] and out.dtype == torch.long and not pinned


def test_compact_indices_are_the_true_positions():
    from medpruner.adapters.sequences import compact_indices

    for seed in range(5):
        mask = torch.rand(200, generator=torch.Generator().manual_seed(seed)) < 0.3
        assert torch.equal(compact_indices(mask, int(mask.sum())), mask.nonzero().flatten())
    assert compact_indices(torch.zeros(4, dtype=torch.bool), 0).numel() == 0
