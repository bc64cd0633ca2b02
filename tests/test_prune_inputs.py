"""``prune_inputs``, the core: on every family and mode, the unpatched model's own ``generate`` and
``forward`` fed the pruned inputs give what the patched model gives on the original inputs."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import (
    gemma_processor,
    gemma_volume_inputs,
    qwen_processor,
    qwen_volume_inputs,
    synthetic_volume,
    tiny_gemma3,
    tiny_qwen2_5_vl,
    tiny_qwen3_vl,
)
from medpruner import MedPrunerConfig, apply_medpruner, prune_inputs, remove_medpruner

VOLUMES = [synthetic_volume(8, seed=1), synthetic_volume(6, seed=2)]
FAMILIES = {
    "qwen3_vl": (tiny_qwen3_vl, lambda: qwen_volume_inputs(qwen_processor("qwen3_vl"), VOLUMES)),
    "qwen2_5_vl": (tiny_qwen2_5_vl, lambda: qwen_volume_inputs(qwen_processor("qwen2_5_vl"), VOLUMES)),
    "gemma3": (tiny_gemma3, lambda: gemma_volume_inputs(gemma_processor(), VOLUMES)),
}
KNOBS = [dict(gamma=0.05, tau=0.9), dict(gamma=0.05, tau=0.9, mode="paper"), dict(gamma=0.05, budget=0.25),
         dict(gamma=0.05, tau=0.5, merge=False)]
NEW_TOKENS = 6


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    build, inputs = FAMILIES[request.param]
    return request.param, build().eval(), inputs()


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_unpatched_generate_on_pruned_inputs_equals_the_patched_model(family, knobs):
    name, model, inputs = family
    apply_medpruner(model, **knobs)
    with torch.no_grad():
        patched = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        patched_logits = model(**inputs).logits[:, -1]
    stats = model.medpruner_stats
    remove_medpruner(model)
    assert not hasattr(model, "medpruner_stats")

    call, pruned_stats = prune_inputs(model, inputs, return_stats=True, **knobs)
    assert not hasattr(model, "medpruner_stats") and not hasattr(model, "medpruner_config")  # nothing patched
    assert pruned_stats.tokens_per_slice == stats.tokens_per_slice and pruned_stats.tokens_after < stats.tokens_before
    with torch.no_grad():
        logits = model(**call).logits[:, -1]
    torch.testing.assert_close(logits, patched_logits, rtol=1e-4, atol=1e-4)
    call = prune_inputs(model, inputs, **knobs)
    with torch.no_grad():
        plain = model.generate(**call, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt, pruned = inputs["input_ids"].shape[1], call["input_ids"].shape[1]
    assert pruned < prompt
    assert plain[:, pruned:].tolist() == patched[:, prompt:].tolist()


def test_inputs_without_images_and_bad_arguments(family):
    name, model, inputs = family
    text_only = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    assert prune_inputs(model, text_only) == text_only
    assert prune_inputs(model, text_only, return_stats=True)[1] is None
    with pytest.raises(TypeError, match="either config or knobs"):
        prune_inputs(model, inputs, config=MedPrunerConfig(), gamma=0.1)
    with pytest.raises(ValueError, match="tau"):
        prune_inputs(model, inputs, tau=0.0)
    with pytest.raises(TypeError, match="prune_inputs|unexpected keyword"):
        prune_inputs(model, inputs, gama=0.1)
