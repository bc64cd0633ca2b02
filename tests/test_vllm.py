"""MedPruner inside vLLM (``medpruner.vllm``) on the CPU build of vLLM, in-process, on a tiny
random-weight Qwen3-VL saved to a temporary folder (text head dim 32: the CPU attention backend
rejects 16).

* equivalence: vLLM + plugin greedy tokens == HF ``apply_medpruner(budget=...)`` on the same volume;
* identity: gamma below every distance and budget 1.0 == unpatched vLLM;
* bad knobs (NaN gamma, budget 0, slices of differing size) fail alone, naming the problem, and the
  engine then serves the same good request with the same tokens.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'medpruner-kernels[vllm]')")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
from _tiny_models import synthetic_volume  # noqa: E402

SLICES = 6
PROMPT = (
    "<|im_start|>user\n"
    + "<|vision_start|><|image_pad|><|vision_end|>" * SLICES
    + "Describe.<|im_end|>\n<|im_start|>assistant\n"
)
NEW_TOKENS = 8
BUDGET, GAMMA = 0.5, 0.05
ENGINE = dict(
    max_model_len=1024,
    limit_mm_per_prompt={"image": SLICES},
    dtype="float32",
    enforce_eager=True,
    max_num_seqs=4,
    max_num_batched_tokens=1024,
)


def _images(volume):
    from PIL import Image

    grey = [(s.numpy() * 255).round().astype(np.uint8) for s in volume]
    return [Image.fromarray(np.repeat(g[:, :, None], 3, axis=2)) for g in grey]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from medpruner import _tiny
    from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = _tiny.qwen_tokenizer()
    config = _tiny.tiny_qwen3_vl_config(tokenizer, max_position_embeddings=4096)
    config.text_config.head_dim = 32
    config.text_config.rope_parameters["mrope_section"] = [8, 4, 4]
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config).eval()
    torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.do_sample = False
    size = {"shortest_edge": 256, "longest_edge": 256 * 64}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=8, merge_size=2, temporal_patch_size=2, size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2),
    )
    path = tmp_path_factory.mktemp("tiny_qwen3_vl")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def volume():
    # every second slice nearly repeats the one before: IAF at GAMMA drops those
    return _images(synthetic_volume(SLICES, 64, seed=1))


@pytest.fixture(scope="module")
def plugin_llm(model_dir):
    import medpruner.vllm as mv
    from vllm import LLM

    mv.register()
    return LLM(**mv.llm_kwargs(model_dir, budget=BUDGET, gamma=GAMMA), **ENGINE)


def _generate(llm, images, **knobs):
    from medpruner.vllm import request_kwargs
    from vllm import SamplingParams

    request = {"prompt": PROMPT, "multi_modal_data": {"image": images}}
    if knobs:
        request.update(request_kwargs(**knobs))
    out = llm.generate(request, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), use_tqdm=False)
    return list(out[0].outputs[0].token_ids), len(out[0].prompt_token_ids)


def test_plugin_matches_hf_budget_mode(plugin_llm, model_dir, volume):
    from medpruner import apply_medpruner
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(text=[PROMPT], images=[volume], return_tensors="pt")
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    apply_medpruner(model, gamma=GAMMA, budget=BUDGET)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    stats = model.medpruner_stats
    assert 0 < stats.slices_kept[0] < SLICES, "the volume must exercise IAF (some slices dropped)"
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    tokens, prompt_length = _generate(plugin_llm, volume)
    assert tokens == expected[: len(tokens)] and len(tokens) == len(expected)
    dropped = SLICES - stats.slices_kept[0]
    assert prompt_length == inputs["input_ids"].shape[1] - (stats.tokens_before - stats.tokens_after) - 2 * dropped


@pytest.mark.parametrize(
    "case, message",
    [("nan_gamma", "gamma must be finite"), ("zero_budget", "budget as an int must be >= 1"),
     ("sizes", "share one resolution")],
)
def test_bad_request_fails_alone(plugin_llm, volume, case, message):
    good = _generate(plugin_llm, volume)
    images, knobs = volume, {}
    if case == "nan_gamma":
        knobs = {"gamma": float("nan")}
    elif case == "zero_budget":
        knobs = {"budget": 0}
    else:
        images = volume[:-1] + [volume[-1].resize((96, 96))]
    with pytest.raises(ValueError, match=message):
        _generate(plugin_llm, images, **knobs)
    assert _generate(plugin_llm, volume) == good


# last: a second engine in the same process takes over vLLM's process-wide state
def test_identity_settings_match_unpatched_vllm(plugin_llm, model_dir, volume):
    from vllm import LLM

    pruned_nothing = _generate(plugin_llm, volume, gamma=-1.0, budget=1.0)
    unpatched = LLM(model=str(model_dir), **ENGINE)
    assert _generate(unpatched, volume) == pruned_nothing
