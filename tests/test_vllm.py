"""MedPruner inside vLLM (``medpruner.vllm``) on the CPU build of vLLM, in-process, on tiny random-weight
Qwen3-VL and Qwen2.5-VL models saved to temporary folders (text head dim 32: the CPU attention backend
rejects 16).

* equivalence with HF ``apply_medpruner(budget=...)`` on the same volume, step by step: the IAF mask, the
  per-slice budget counts and the selected tokens are equal, the scores and merged features equal to
  float rounding (two towers), the M-RoPE positions equal at prefill and at every decode step, the raw
  logits within ``LOGIT_TOL`` at every step, and the greedy tokens equal wherever HF's top-2 gap exceeds
  twice that tolerance;
* identity: gamma below every distance and budget 1.0 == unpatched vLLM (tokens and logits);
* bad knobs (NaN gamma, budget 0, slices of differing size) fail alone, naming the problem: good
  requests already running in the engine finish with their own tokens, and the engine keeps serving.

One engine per family is alive at a time (a second engine in the process takes over vLLM's
process-wide state): the module-scoped ``served`` fixture runs every test of one family before the next.
"""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'medpruner-kernels[vllm]')")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402
from _tiny_models import synthetic_volume, tiny_qwen2_5_vl  # noqa: E402

SLICES = 6
PROMPT = (
    "<|im_start|>user\n"
    + "<|vision_start|><|image_pad|><|vision_end|>" * SLICES
    + "Describe.<|im_end|>\n<|im_start|>assistant\n"
)
NEW_TOKENS = 8
BUDGET, GAMMA = 0.5, 0.05
# float32 logits of the two stacks (HF eager/sdpa vs vLLM's CPU kernels) differ by ~3e-7 here
LOGIT_TOL = 1e-4
# features and scores of the two vision towers (same weights, different kernels)
TOWER_TOL = dict(rtol=1e-4, atol=1e-5)
ENGINE = dict(
    max_model_len=1024,
    limit_mm_per_prompt={"image": SLICES},
    dtype="float32",
    enforce_eager=True,
    max_num_seqs=4,
    max_num_batched_tokens=1024,
    # small KV blocks (the CPU backend takes multiples of 32): a repeated volume prefix fills whole
    # blocks, so prefix caching engages
    block_size=32,
    logprobs_mode="raw_logits",
    max_logprobs=-1,
)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _images(volume):
    from PIL import Image

    grey = [(s.numpy() * 255).round().astype(np.uint8) for s in volume]
    return [Image.fromarray(np.repeat(g[:, :, None], 3, axis=2)) for g in grey]


def _hf_class(family):
    import transformers

    return {
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    }[family]


def _save_tiny(family, path, stats=None):
    """A tiny random model of ``family`` with text head dim 32 and its processor, saved to ``path``;
    ``stats``: the processor's (image_mean, image_std) instead of the family's published ones."""
    from medpruner import _tiny
    from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = _tiny.qwen_tokenizer()
    generator_state = torch.random.get_rng_state()
    if family == "qwen3_vl":
        config = _tiny.tiny_qwen3_vl_config(tokenizer, max_position_embeddings=4096, head_dim=32)
        mean, std = [0.5] * 3, [0.5] * 3
        processor_class, video_class = Qwen3VLProcessor, Qwen3VLVideoProcessor
    else:
        config = tiny_qwen2_5_vl().config
        config.text_config.num_attention_heads = 2  # hidden 64 / 2 heads: head dim 32
        config.text_config.rope_parameters["mrope_section"] = [4, 6, 6]
        mean, std = CLIP_MEAN, CLIP_STD
        processor_class, video_class = Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
    if stats is not None:
        mean, std = stats
    torch.manual_seed(0)
    model = _hf_class(family)(config).eval()
    torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.do_sample = False
    size = {"shortest_edge": 256, "longest_edge": 256 * 64}
    processor = processor_class(
        image_processor=Qwen2VLImageProcessor(
            patch_size=8, merge_size=2, temporal_patch_size=2, size=size, image_mean=mean, image_std=std
        ),
        tokenizer=tokenizer,
        video_processor=video_class(patch_size=8, merge_size=2, temporal_patch_size=2),
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _kept_slices(items) -> list[bool]:
    """The IAF mask of one request from the processor's kept items (a dropped slice leaves the request;
    the kept slice before it counts it in ``medpruner_counts[3]``)."""
    mask = []
    for item in items:
        kept, _, _, skipped = item["medpruner_counts"].data.tolist()
        mask += [kept > 0] + [False] * skipped
    return mask


@pytest.mark.parametrize("device_normalize", [True, False])
def test_gamma_is_on_the_checkpoints_own_scale(tmp_path, device_normalize):
    """Qwen2.5-VL checkpoints normalised with the CLIP mean/std and with mean = std = 0.5 keep the same
    slices of one volume at every gamma, in the vLLM processor (the tower normalising on the device or
    the processor itself) and through HF ``apply_medpruner`` on the model loaded from each folder: the
    slices IAF keeps on the paper's [-1, 1] scale. Among the gammas is one where rescaling the 0.5
    checkpoint's pixels by the CLIP std (what the adapter did whatever the processor used) decides
    otherwise."""
    import medpruner.vllm as mv
    from medpruner import apply_medpruner
    from transformers import AutoProcessor
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from medpruner_kernels import reference

    depth = 8
    images = _images(synthetic_volume(depth, 64, seed=11, repeat_every=3))
    prompt = PROMPT.replace(
        "<|vision_start|><|image_pad|><|vision_end|>" * SLICES, "<|vision_start|><|image_pad|><|vision_end|>" * depth
    )
    mv.register()
    checkpoints = {"clip": (CLIP_MEAN, CLIP_STD), "half": ([0.5] * 3, [0.5] * 3)}
    processors, models, inputs = {}, {}, {}
    for name, stats in checkpoints.items():
        path = tmp_path / name
        _save_tiny("qwen2_5_vl", path, stats=stats)
        served = mv.llm_kwargs(path, budget=BUDGET, gamma=GAMMA)
        config = ModelConfig(
            model=served["model"],
            hf_overrides=served["hf_overrides"],
            dtype="float32",
            limit_mm_per_prompt={"image": depth},
            mm_device_do_normalize=device_normalize,
        )
        processors[name] = MULTIMODAL_REGISTRY.create_processor(config)
        models[name] = _hf_class("qwen2_5_vl").from_pretrained(path, dtype=torch.float32).eval()
        inputs[name] = AutoProcessor.from_pretrained(path)(text=[prompt], images=[images], return_tensors="pt")
    token_ids = processors["half"].info.get_tokenizer().encode(prompt)

    cu = torch.tensor([0, depth])
    paper = inputs["half"]["pixel_values"].double().reshape(depth, -1)  # mean = std = 0.5: the paper's scale
    clip_std = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1)
    half_as_clip = (paper.reshape(paper.shape[0], 3, -1) * clip_std / 0.5).reshape(depth, -1)
    consecutive = (paper[1:] - paper[:-1]).abs().mean(1).sort().values.tolist()
    differs = 0
    for gamma in [(a + b) / 2 for a, b in zip(consecutive[:-1], consecutive[1:], strict=True)]:
        expected = reference.iaf_select(paper, gamma, cu)[0].tolist()
        for name in checkpoints:
            out = processors[name].apply(
                ProcessorInputs(
                    prompt=token_ids,
                    mm_data_items=processors[name].info.parse_mm_data({"image": images}),
                    hf_processor_mm_kwargs={"gamma": gamma},
                ),
                TimingContext(enabled=False),
            )
            assert _kept_slices(out["mm_kwargs"]["image"]) == expected, (name, gamma)
            apply_medpruner(models[name], gamma=gamma, budget=BUDGET)
            with torch.no_grad():
                models[name](**inputs[name])
            assert [n > 0 for n in models[name].medpruner_stats.tokens_per_slice[0]] == expected, (name, gamma)
        differs += reference.iaf_select(half_as_clip, gamma, cu)[0].tolist() != expected
    assert differs > 0, "no gamma tells the checkpoint's std from the CLIP std: the test proves nothing"


def test_compat_names_are_checked_when_the_plugin_registers(monkeypatch, caplog):
    """Every vLLM internal the plugin uses resolves on the tested vLLM, the package declares the range
    it is tested on, and ``register()`` names each missing name (an object, a member, a keyword
    parameter) together with that range; a vLLM outside the range that has them all gets a warning."""
    import re
    from pathlib import Path

    import medpruner.vllm as mv
    from medpruner.vllm import _compat

    assert _compat.missing_names() == []
    assert _compat.in_tested_range(_compat.vllm_version())
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.findall(r"^vllm = \[(.*)\]$", pyproject, re.MULTILINE) == [f'"vllm{_compat.TESTED_RANGE}"']
    assert [_compat.in_tested_range(v) for v in ("0.32.0", "0.32.3.dev2+gabc", "0.31.9", "0.33.0")] == [
        True,
        True,
        False,
        False,
    ]

    module, _ = _compat.NAMES["load_norm_params"]
    monkeypatch.setitem(_compat.NAMES, "load_norm_params", (module, "_load_norm_params_v2"))
    monkeypatch.setattr(
        _compat,
        "MEMBERS",
        (*_compat.MEMBERS, ("MultiModalFieldConfig", "batched", ("on_cpu",)), ("PlaceholderRange", "start", ())),
    )
    monkeypatch.setattr(_compat, "_resolved", {})
    monkeypatch.setattr(_compat, "_checked", False)
    with pytest.raises(_compat.VllmCompatError) as error:
        mv.register()
    message = str(error.value)
    for part in (
        f"{module}._load_norm_params_v2",
        "MultiModalFieldConfig.batched(on_cpu=)",
        "PlaceholderRange.start",
        f"vllm{_compat.TESTED_RANGE}",
        "3 name(s)",
        "VLLM_PLUGINS",
    ):
        assert part in message, (part, message)

    monkeypatch.setattr(_compat, "NAMES", {k: v for k, v in _compat.NAMES.items() if k != "load_norm_params"})
    monkeypatch.setattr(_compat, "MEMBERS", _compat.MEMBERS[:-2])
    monkeypatch.setattr(_compat, "vllm_version", lambda: "0.33.1")
    with caplog.at_level("WARNING", logger="medpruner"):
        _compat.check()
    assert "tested on vllm>=0.32,<0.33; the installed vllm 0.33.1" in caplog.text


@pytest.mark.parametrize(
    "feature, engine, message",
    [
        ("evs", {"video_pruning_rate": 0.5}, "EVS \\(video_pruning_rate=0.5\\)"),
        (
            "drafter",
            {"speculative_config": {"method": "draft_model", "num_speculative_tokens": 2}},
            "method 'draft_model' runs a drafter network",
        ),
    ],
)
def test_unsupported_features_are_refused_at_start_up(tmp_path, feature, engine, message):
    """EVS and drafter-network speculative decoding stop ``LLM(...)`` while vLLM builds its config,
    before any engine starts, naming the feature."""
    import medpruner.vllm as mv
    from vllm import LLM

    path = tmp_path / "tiny_qwen3_vl"
    _save_tiny("qwen3_vl", path)
    if "speculative_config" in engine:
        engine = {"speculative_config": {**engine["speculative_config"], "model": str(path)}}
    mv.register()
    with pytest.raises(ValueError, match=message):
        LLM(**mv.llm_kwargs(path, budget=BUDGET, gamma=GAMMA), **{**ENGINE, **engine})


def test_position_offsets_survive_cuda_graph_replay():
    """A CUDA graph records the forward once and replays its tensor operations without running its
    Python (``cudagraph_mode=FULL``, or a decode graph replaying a one-token prefill chunk). The forward
    is traced once with no image in the step (``make_fx``, tensors captured by address as a graph
    captures them) and replayed: each step's in-slice offsets, written by ``embed_input_ids`` before it,
    reach the positions, and a step without images adds nothing."""
    from medpruner.vllm.models import MedPrunerModelMixin, PositionOffsets
    from torch.fx.experimental.proxy_tensor import make_fx

    class Upstream(torch.nn.Module):
        def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
            return torch.zeros(input_ids.shape[0], 2)

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            return positions

    class Model(MedPrunerModelMixin, Upstream):
        def __init__(self, width):  # the language-model half of the mixin only
            Upstream.__init__(self)
            self.medpruner_positions = PositionOffsets(width)

    tokens = 8
    model = Model(tokens)
    ids = torch.arange(tokens)
    embeds = torch.zeros(tokens, 2)
    graph = make_fx(lambda positions, x: model.forward(None, positions, None, x))(
        torch.zeros(3, tokens, dtype=torch.long), embeds
    )
    base = torch.arange(3 * tokens, dtype=torch.long).reshape(3, tokens)
    image = torch.zeros(tokens, dtype=torch.bool)
    image[2:5] = True
    offsets = torch.tensor([[0, 0, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.float32)  # [tokens, (t, h, w)]
    item = torch.cat([torch.randn(3, 2), offsets], 1)

    model.embed_input_ids(ids, [item], is_multimodal=image)
    expected = base.clone()
    expected[:, 2:5] += offsets.T.long()
    assert torch.equal(graph(base, embeds), expected)
    model.embed_input_ids(ids, [], is_multimodal=torch.zeros(tokens, dtype=torch.bool))
    assert torch.equal(graph(base, embeds), base)
    model.embed_input_ids(ids[:5], [item], is_multimodal=image[:5])  # a shorter step, padded to the graph's size
    assert torch.equal(graph(base, embeds), expected)
    assert torch.equal(graph(base, embeds), base), "a replay without a new write must add nothing"


@pytest.fixture(scope="module")
def volume():
    # every second slice nearly repeats the one before: IAF at GAMMA drops those
    return _images(synthetic_volume(SLICES, 64, seed=1))


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def served(request, tmp_path_factory):
    """(family, model folder, engine with the plugin); the engine is shut down after the family."""
    import medpruner.vllm as mv
    from vllm import LLM

    family = request.param
    path = tmp_path_factory.mktemp(f"tiny_{family}")
    _save_tiny(family, path)
    mv.register()
    llm = LLM(**mv.llm_kwargs(path, budget=BUDGET, gamma=GAMMA), **ENGINE)
    yield family, path, llm
    _shutdown(llm)


def _shutdown(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _request(images, **knobs):
    from medpruner.vllm import request_kwargs

    request = {"prompt": PROMPT, "multi_modal_data": {"image": images}}
    if knobs:
        request.update(request_kwargs(**knobs))
    return request


def _token_ids(path) -> dict[str, int]:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    return {
        "start": config["vision_start_token_id"],
        "image": config["image_token_id"],
        "end": config["vision_end_token_id"],
    }


def _params(logits: bool = False):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=-1 if logits else None)


def _generate(llm, images, **knobs):
    out = llm.generate(_request(images, **knobs), _params(), use_tqdm=False)
    return list(out[0].outputs[0].token_ids), len(out[0].prompt_token_ids)


def _raw_logits(output, vocab: int) -> torch.Tensor:
    """``[steps, vocab]`` raw logits of a request generated with ``logprobs=-1`` (raw_logits mode)."""
    rows = torch.full((len(output.logprobs), vocab), float("nan"))
    for step, entries in enumerate(output.logprobs):
        for token, entry in entries.items():
            if token < vocab:
                rows[step, token] = entry.logprob
    return rows


class _Recorder:
    """Records, per phase ("hf" or "vllm"), the outputs of the shared adapter code (IAF mask, budget
    counts, selection) and the positions the language model receives at every forward."""

    def __init__(self, monkeypatch):
        from medpruner.adapters.base import Adapter
        from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
        from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration

        self.phase = None
        self.calls: dict[tuple[str, str], list] = {}
        iaf, counts, select = Adapter._iaf, Adapter._budget_counts, Adapter.select_tokens

        def record_iaf(adapter, *args, **kwargs):
            return self._add("iaf", iaf(adapter, *args, **kwargs))

        def record_counts(*args, **kwargs):
            return self._add("counts", counts(*args, **kwargs))

        def record_select(adapter, scores, keys, pooled, *args, **kwargs):
            keep, features = select(adapter, scores, keys, pooled, *args, **kwargs)
            self._add("select", (scores.clone(), keep.clone(), features.clone()))
            return keep, features

        monkeypatch.setattr(Adapter, "_iaf", record_iaf)
        monkeypatch.setattr(Adapter, "_budget_counts", staticmethod(record_counts))
        monkeypatch.setattr(Adapter, "select_tokens", record_select)
        for upstream in (Qwen3VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration):
            monkeypatch.setattr(upstream, "forward", self._positions_of(upstream.forward))

    def _add(self, name, value):
        if self.phase is not None:
            self.calls.setdefault((self.phase, name), []).append(value)
        return value

    def _positions_of(self, forward):
        def wrapped(model, input_ids, positions, *args, **kwargs):
            self._add("positions", positions.clone())
            return forward(model, input_ids, positions, *args, **kwargs)

        return wrapped

    def hf_hook(self, model):
        """Record the M-RoPE rows of the position ids HF's language model receives."""

        def hook(module, args, kwargs):
            self._add("positions", kwargs["position_ids"][-3:, 0].clone())

        return model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)

    def one(self, phase, name):
        values = self.calls.get((phase, name), [])
        assert len(values) == 1, f"{phase} ran {name} {len(values)} times, expected once"
        return values[0]


def _hf_reference(family, path, images, recorder, **knobs):
    from medpruner import apply_medpruner
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    inputs = processor(text=[PROMPT], images=[images], return_tensors="pt")
    model = _hf_class(family).from_pretrained(path, dtype=torch.float32).eval()
    apply_medpruner(model, gamma=GAMMA, budget=BUDGET, **knobs)
    handle = recorder.hf_hook(model)
    recorder.phase = "hf"
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
    finally:
        recorder.phase = None
        handle.remove()
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return inputs, model.medpruner_stats, tokens, torch.stack([step[0] for step in out.logits])


def test_the_model_runner_is_the_one_asked_for(served):
    """CI runs this file under both model runners (scripts/ci_vllm.sh): the engine runs Model Runner V2
    exactly when VLLM_USE_V2_MODEL_RUNNER=1 (on CPU, V2 needs Triton with a `cpu` backend; vLLM falls back
    to V1 without one)."""
    _, _, llm = served
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    asked = os.environ.get("VLLM_USE_V2_MODEL_RUNNER") == "1"
    runner = type(worker.model_runner).__module__
    assert runner == ("vllm.v1.worker.cpu.model_runner" if asked else "vllm.v1.worker.cpu_model_runner"), runner


def test_plugin_matches_hf_budget_mode(served, volume, monkeypatch):
    family, path, llm = served
    recorder = _Recorder(monkeypatch)
    inputs, stats, expected, hf_logits = _hf_reference(family, path, volume, recorder)
    assert 0 < stats.slices_kept[0] < SLICES, "the volume must exercise IAF (some slices dropped)"

    llm.reset_mm_cache()  # the processor and encoder must run for this request
    llm.reset_prefix_cache()
    recorder.phase = "vllm"
    try:
        out = llm.generate(_request(volume), _params(logits=True), use_tqdm=False)[0]
    finally:
        recorder.phase = None
    tokens = list(out.outputs[0].token_ids)
    logits = _raw_logits(out.outputs[0], hf_logits.shape[1])

    # the processor's IAF mask and budget split are the HF path's, exactly
    assert torch.equal(recorder.one("vllm", "iaf")[0], recorder.one("hf", "iaf")[0])
    for hf_count, vllm_count in zip(recorder.one("hf", "counts"), recorder.one("vllm", "counts"), strict=True):
        assert torch.equal(vllm_count, hf_count)
    # the tower's scores and the selection over the kept slices
    hf_scores, hf_keep, hf_features = recorder.one("hf", "select")
    scores, keep, features = recorder.one("vllm", "select")
    torch.testing.assert_close(scores, hf_scores, **TOWER_TOL)
    assert torch.equal(keep, hf_keep)
    torch.testing.assert_close(features, hf_features, **TOWER_TOL)

    # positions: the pruned prompt at prefill, then one position per decode step
    hf_positions = recorder.calls[("hf", "positions")]
    positions = recorder.calls[("vllm", "positions")]
    assert len(positions) == len(hf_positions) == len(tokens)
    prompt_length = hf_positions[0].shape[1]
    assert len(out.prompt_token_ids) == prompt_length
    assert torch.equal(positions[0][:, :prompt_length], hf_positions[0])
    for step in range(1, len(tokens)):
        assert torch.equal(positions[step][:, :1], hf_positions[step]), f"decode step {step}"
    dropped = SLICES - stats.slices_kept[0]
    assert prompt_length == inputs["input_ids"].shape[1] - (stats.tokens_before - stats.tokens_after) - 2 * dropped

    # logits at every step until the first token that float noise may flip; the tokens up to it
    assert len(tokens) == len(expected) == NEW_TOKENS
    for step, (token, hf_token) in enumerate(zip(tokens, expected, strict=True)):
        difference = (logits[step] - hf_logits[step]).abs().max().item()
        assert difference <= LOGIT_TOL, f"step {step}: logits differ by {difference:.3g}"
        top = hf_logits[step].topk(2).values
        if token != hf_token:
            assert top[0] - top[1] <= 2 * LOGIT_TOL, f"step {step}: token {token} != HF {hf_token}"
            break


def test_slice_stage_variants_match_hf(served, volume, monkeypatch):
    """Per-request local-change IAF and the change-following split: the processor keeps the slices and
    reserves the counts the HF path keeps, and generates its tokens."""
    family, path, llm = served
    recorder = _Recorder(monkeypatch)
    knobs = {"iaf": "local", "gamma_local": 0.1, "allocation": "change"}
    _, stats, expected, _ = _hf_reference(family, path, volume, recorder, **knobs)
    assert 0 < stats.slices_kept[0] < SLICES, "the volume must exercise local IAF (some slices dropped)"
    llm.reset_mm_cache()
    llm.reset_prefix_cache()
    recorder.phase = "vllm"
    try:
        out = llm.generate(_request(volume, gamma=GAMMA, budget=BUDGET, **knobs), _params(), use_tqdm=False)[0]
    finally:
        recorder.phase = None
    hf_keep, hf_change = recorder.one("hf", "iaf")
    keep, change = recorder.one("vllm", "iaf")
    assert torch.equal(keep, hf_keep)
    torch.testing.assert_close(change, hf_change, **TOWER_TOL)
    # the counts the processor reserved are the HF path's, slice by slice
    hf_counts = stats.tokens_per_slice[0]
    assert sum(hf_counts) == stats.tokens_after
    hf_scores, hf_keep_tokens, _ = recorder.one("hf", "select")
    _, keep_tokens, _ = recorder.one("vllm", "select")
    assert torch.equal(keep_tokens, hf_keep_tokens)
    assert list(out.outputs[0].token_ids)[:1] == expected[:1]


@pytest.mark.parametrize(
    "case, message",
    [
        ("nan_gamma", "gamma must be finite"),
        ("zero_budget", "budget as an int must be >= 1"),
        ("sizes", "share one resolution"),
    ],
)
def test_bad_request_fails_alone(served, volume, case, message):
    _, _, llm = served
    good = _generate(llm, volume)
    images, knobs = volume, {}
    if case == "nan_gamma":
        knobs = {"gamma": float("nan")}
    elif case == "zero_budget":
        knobs = {"budget": 0}
    else:
        images = volume[:-1] + [volume[-1].resize((96, 96))]
    with pytest.raises(ValueError, match=message):
        _generate(llm, images, **knobs)
    assert _generate(llm, volume) == good


def test_bad_request_beside_running_requests(served, volume):
    """Good requests in flight (one already prefilled, one added after) are batched with the bad one's
    arrival and finish with their solo tokens. ``LLM.generate([good, bad])`` itself aborts the whole
    call (vLLM's offline API adds the prompts one by one and aborts those added when one fails), so the
    engine-level ``add_request`` is what a server does per request."""
    _, _, llm = served
    other = {"gamma": 0.5 * GAMMA, "budget": 0.25}
    solo = {"first": _generate(llm, volume)[0], "second": _generate(llm, volume, **other)[0]}
    llm.reset_prefix_cache()

    with pytest.raises(ValueError, match="gamma must be finite"):
        llm.generate([_request(volume), _request(volume, gamma=float("nan"))], _params(), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()

    engine = llm.llm_engine
    engine.add_request("first", _request(volume), _params())
    engine.step()  # the first request is prefilled and decoding when the bad one arrives
    with pytest.raises(ValueError, match="budget as an int must be >= 1"):
        engine.add_request("bad", _request(volume, budget=0), _params())
    engine.add_request("second", _request(volume, **other), _params())
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)
    assert finished == solo


# last in each family: a second engine in the same process takes over vLLM's process-wide state


def test_eval_engine_records_match_direct_generation(served, tmp_path):
    """``medpruner eval --engine vllm``'s run (:func:`run_vllm_eval`) on the served engine, 3 samples in
    chunks of 2: each record's answer is a direct ``llm.generate`` of the same prompt, slices and knobs;
    the reference's prompt is the HF processor's token for token and it keeps everything (KL 0);
    medpruner_budget keeps exactly the budget rule's count of the slices its prompt holds; the summary
    is written and a rerun resumes without a new line."""
    import json
    import math
    import re

    from medpruner.config import MedPrunerConfig
    from medpruner.eval.readers import read_dataset
    from medpruner.eval.runner import EvalSettings, build_prompt
    from medpruner.eval.vllm_engine import run_vllm_eval, vllm_model
    from medpruner.pipeline import volume_to_inputs
    from medpruner.vllm import request_kwargs
    from vllm import SamplingParams

    family, path, llm = served
    lines = []
    for k in range(3):
        np.save(tmp_path / f"v{k}.npy", synthetic_volume(SLICES, 64, seed=10 + k).numpy())
        lines.append(
            json.dumps(
                {
                    "id": f"s{k}",
                    "volume": f"v{k}.npy",
                    "unit_range": True,
                    "category": "c",
                    "question": "Is there a lesion?",
                    "options": {"A": "yes", "B": "no"},
                    "answer": "yes",
                    "answer_letter": "A",
                }
            )
        )
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    dataset = read_dataset(tmp_path / "d.jsonl", "jsonl")
    settings = EvalSettings(methods=("medpruner_budget",), gamma=GAMMA, resolution=64, max_new_tokens=4, bootstrap=20)
    model = vllm_model(llm, path, MedPrunerConfig(gamma=GAMMA, budget=BUDGET))
    out = tmp_path / "out"
    summary = run_vllm_eval(dataset, model, settings, BUDGET, out, chunk=2, progress=False, html=False)
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * len(dataset.samples)
    assert summary["methods_run"] == ["none", "medpruner_budget"] and summary["methods_added"] == ["none"]
    assert json.loads((out / "summary.json").read_text())["methods"]["medpruner_budget"]["n"] == 3

    processor, tokenizer = model.processor, model.processor.tokenizer
    block_ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>"])
    per_slice = (64 // 16) ** 2  # patch 8, merge 2
    knobs = {"none": {"gamma": -1.0, "budget": 1.0}, "medpruner_budget": {"gamma": GAMMA, "budget": BUDGET}}
    dropped_any = False
    for record in records:
        sample = next(s for s in dataset.samples if s.sample_id == record["sample_id"])
        volume = synthetic_volume(SLICES, 64, seed=10 + int(sample.sample_id[1:]))
        images = _images(volume)
        grey = torch.from_numpy(np.stack([np.asarray(image)[:, :, 0] for image in images]) / 255.0)
        hf = volume_to_inputs(processor, grey, build_prompt(sample), family=family)
        # vLLM takes one placeholder per slice and expands it itself
        text = re.sub(r"(<\|image_pad\|>)+", "<|image_pad|>", tokenizer.decode(hf["input_ids"][0]))
        request = {"prompt": text, "multi_modal_data": {"image": images}, **request_kwargs(**knobs[record["method"]])}
        direct = llm.generate(request, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
        answer = tokenizer.decode(direct.outputs[0].token_ids, skip_special_tokens=True).strip()
        assert record["prediction"] == answer, record["key"]
        kept = direct.prompt_token_ids.count(block_ids[0])
        assert record["slices_kept"] == kept and record["slices_total"] == SLICES
        assert record["tokens_kept"] == direct.prompt_token_ids.count(block_ids[1])
        assert record["tokens_total"] == SLICES * per_slice
        assert record["tokens_after_slice_stage"] == kept * per_slice
        assert len(record["kept_slices"]) == kept and sum(record["tokens_per_slice"]) == record["tokens_kept"]
        assert math.isfinite(record["first_token_kl"]) and record["first_token_kl"] >= 0
        if record["method"] == "none":
            # the text went through the HF processor: the reference's prompt is its input ids, placeholders
            # and all (each slice gets the HF grid)
            assert direct.prompt_token_ids == hf["input_ids"][0].tolist()
            assert record["kept_slices"] == list(range(SLICES)) and record["retention"] == 1.0
            assert record["first_token_kl"] == 0.0 and record["top1"] == record["reference_top1"]
        else:
            budget = min(max(math.ceil(BUDGET * kept * per_slice), kept), kept * per_slice)
            assert record["budget"] == record["tokens_kept"] == budget
            assert record["retention"] == budget / (SLICES * per_slice)
            dropped_any |= kept < SLICES
    assert dropped_any, "the volumes must exercise IAF at GAMMA"

    before = (out / "samples.jsonl").read_text()
    again = run_vllm_eval(dataset, model, settings, BUDGET, out, chunk=2, progress=False, html=False)
    assert (out / "samples.jsonl").read_text() == before
    assert again["methods"]["none"]["n"] == 3 and again["settings_id"] == summary["settings_id"]


def test_a_second_question_about_a_volume_reuses_its_prefix(served, volume):
    """Several questions about one volume share its slices, so prefix caching covers the second
    question's first slices (the engine reports the cached tokens, whole blocks of the shared prefix) and
    vLLM strips them to their CPU metadata:
    the plugin's per-slice counts must be among it (M-RoPE positions need them). The second question
    gets the tokens it gets on an empty cache."""
    _, path, llm = served
    second = {**_request(volume), "prompt": PROMPT.replace("Describe.", "Is there a lesion?")}
    slice_end = _token_ids(path)["end"]

    def run(request):
        out = llm.generate(request, _params(), use_tqdm=False)[0]
        return list(out.outputs[0].token_ids), list(out.prompt_token_ids), out.num_cached_tokens

    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    tokens, prompt, cached = run(second)
    assert cached == 0
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    run(_request(volume))
    again, prompt_again, cached = run(second)
    assert (again, prompt_again) == (tokens, prompt)
    whole_slices = [i for i, token in enumerate(prompt) if token == slice_end and i < cached]
    assert whole_slices, f"the {cached} cached tokens hold no whole slice"


# The identity test starts a second engine, after which the served one cannot run: it stays last.
def test_identity_settings_match_unpatched_vllm(served, volume):
    from vllm import LLM

    _, path, llm = served
    pruned_nothing = llm.generate(_request(volume, gamma=-1.0, budget=1.0), _params(logits=True), use_tqdm=False)
    unpatched = LLM(model=str(path), **ENGINE)
    try:
        reference = unpatched.generate(_request(volume), _params(logits=True), use_tqdm=False)
    finally:
        _shutdown(unpatched)
    ours, theirs = pruned_nothing[0], reference[0]
    assert ours.prompt_token_ids == theirs.prompt_token_ids
    assert list(ours.outputs[0].token_ids) == list(theirs.outputs[0].token_ids)
    vocab = max(max(step) for step in theirs.outputs[0].logprobs) + 1
    difference = (_raw_logits(ours.outputs[0], vocab) - _raw_logits(theirs.outputs[0], vocab)).abs().max().item()
    assert difference <= LOGIT_TOL


# Tests that start an engine of their own come after the identity test.
CHUNK = 24  # prefill chunk (max_num_batched_tokens): 2.5 kept slices of 8 tokens plus text


def _generate_on_own_engine(path, volume, recorder, requests: int, **engine):
    """``requests`` runs of one request on a new plugin engine with ``engine`` settings (the first
    recorded as phase "vllm"); the engine is shut down after."""
    import medpruner.vllm as mv
    from vllm import LLM

    llm = LLM(**mv.llm_kwargs(path, budget=BUDGET, gamma=GAMMA), **{**ENGINE, **engine})
    outputs = []
    try:
        for run in range(requests):
            recorder.phase = "vllm" if run == 0 else None
            outputs.append(llm.generate(_request(volume), _params(), use_tqdm=False)[0])
    finally:
        recorder.phase = None
        _shutdown(llm)
    return outputs


def _assert_hf_tokens(tokens, expected, hf_logits):
    """The greedy tokens are HF's up to the first step where HF's top-2 gap is within float noise."""
    assert len(tokens) == len(expected) == NEW_TOKENS
    for step, (token, hf_token) in enumerate(zip(tokens, expected, strict=True)):
        if token != hf_token:
            top = hf_logits[step].topk(2).values
            assert top[0] - top[1] <= 2 * LOGIT_TOL, f"step {step}: token {token} != HF {hf_token}"
            break


def test_chunked_prefill_and_prefix_cache(served, volume, monkeypatch):
    """Prefill chunks of CHUNK tokens, which end inside slices' placeholders, with prefix caching on:
    the prompt's positions gathered over the chunks are HF's, the greedy tokens are HF's (up to a float
    tie, as in test_plugin_matches_hf_budget_mode), and a second run of the request reads its prefix,
    slices included, from the cache (the engine reports the cached tokens) and gets the same tokens."""
    family, path, _ = served
    recorder = _Recorder(monkeypatch)
    _, _, expected, hf_logits = _hf_reference(family, path, volume, recorder)
    hf_prefill = recorder.calls[("hf", "positions")][0]
    first, second = _generate_on_own_engine(
        path, volume, recorder, 2, max_num_batched_tokens=CHUNK, enable_prefix_caching=True
    )

    prompt, ids = list(first.prompt_token_ids), _token_ids(path)
    length = len(prompt)
    assert any(prompt[b - 1] == prompt[b] == ids["image"] for b in range(CHUNK, length, CHUNK)), (
        "no prefill chunk ends inside a slice"
    )
    steps = recorder.calls[("vllm", "positions")]
    chunks = -(-length // CHUNK)
    assert [p.shape[1] for p in steps[:chunks]] == [min(CHUNK, length - c * CHUNK) for c in range(chunks)]
    assert torch.equal(torch.cat(steps[:chunks], 1), hf_prefill)
    tokens = list(first.outputs[0].token_ids)
    _assert_hf_tokens(tokens, expected, hf_logits)
    assert first.num_cached_tokens == 0
    assert list(second.outputs[0].token_ids) == tokens
    last_image = length - 1 - prompt[::-1].index(ids["image"])
    assert second.num_cached_tokens > last_image, (second.num_cached_tokens, last_image)


# Last in the module: vLLM's n-gram proposer imports numba, whose llvmlite library object breaks the
# module scan the CPU platform runs when a later engine starts (vllm.triton_utils.dispatcher).
def test_speculative_ngram(volume, tmp_path, monkeypatch):
    """n-gram speculative decoding (a proposer that reads token ids only): drafts are verified (steps
    of more than one token after the prefill) and the greedy tokens are HF's, as without it."""
    family, path = "qwen3_vl", tmp_path / "tiny_qwen3_vl"
    _save_tiny(family, path)
    recorder = _Recorder(monkeypatch)
    _, _, expected, hf_logits = _hf_reference(family, path, volume, recorder)
    speculative = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    [out] = _generate_on_own_engine(path, volume, recorder, 1, speculative_config=speculative)
    steps = recorder.calls[("vllm", "positions")]
    assert steps[0].shape[1] == len(out.prompt_token_ids)
    assert any(p.shape[1] > 1 for p in steps[1:]), "no step verified draft tokens"
    _assert_hf_tokens(list(out.outputs[0].token_ids), expected, hf_logits)
