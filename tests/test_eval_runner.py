"""The eval runner: selectors inside a tiny Qwen3-VL through the pipeline (checked against the unpatched
model on explicitly pruned inputs and against apply_medpruner), matched budgets, the two stages, the
audit and fidelity in the summary and the HTML, resume after an interruption."""

from __future__ import annotations

import json

import numpy as np
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
from medpruner import MedPrunerConfig, apply_medpruner, remove_medpruner
from medpruner.adapters.qwen3_vl import Qwen3VLAdapter
from medpruner.eval import audit
from medpruner.eval.readers import Sample, VolumeRef, read_dataset
from medpruner.eval.report import pareto_front
from medpruner.eval.runner import (
    RECORDS_NAME,
    EngineEvent,
    EvalModel,
    EvalSettings,
    build_prompt,
    drive_eval,
    patch_with_policy,
    read_records,
    resolve_methods,
    run_eval,
)
from medpruner.selectors import SELECTORS, SelectorPolicy, get_selector

BACKEND = "torch"
SETTINGS = dict(gamma=0.05, tau=0.5, merge=True, context_frac=0.05)
ALL_METHODS = tuple(sorted(SELECTORS))
SLICE_ONLY = ("iaf", "uniform_slices")
TOKEN_ONLY = ("dins", "random", "topk", "visionzip", "divprune", "evs", "hiprune")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tiny_qwen3_vl(seed=0), qwen_processor()


@pytest.fixture(scope="module")
def volume_inputs(tiny):
    # 5 slices of 32x48 pixels: 2x3 LLM tokens each; slices 2 and 4 nearly repeat the one before (IAF drops them)
    _, processor = tiny
    return qwen_volume_inputs(processor, [synthetic_volume(5, 48, seed=1)[:, :32]], "Which organ?")


def _config():
    return MedPrunerConfig(backend=BACKEND, tau=SETTINGS["tau"])


def patch_with_selector(model, method, *, budgets=None, settings=None, config=None):
    """The eval's way: the method as a policy, run by the model's own pipeline; returns the policy."""
    policy = SelectorPolicy(method, budgets=budgets, settings=settings)
    patch_with_policy(model, policy, config)
    return policy


def _explicit_call(model, inputs, slice_keep, token_keep, features):
    """The unpatched model's inputs with exactly the selected tokens: a dropped slice loses its wrapper,
    every kept token keeps its unpruned M-RoPE position and receives the given feature row (plain loops)."""
    cfg, inner = model.config, model.model
    with torch.no_grad():
        positions, _ = inner.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=inputs["attention_mask"])
        full = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    row = inputs["input_ids"][0].tolist()
    kept, image, token, inside_dropped = [], -1, 0, False
    for j, t in enumerate(row):
        if t == cfg.vision_start_token_id:
            image += 1
            inside_dropped = not bool(slice_keep[image])
        if t == cfg.image_token_id:
            if token_keep[token]:
                kept.append(j)
            token += 1
        elif not (inside_dropped and t in (cfg.vision_start_token_id, cfg.vision_end_token_id)):
            kept.append(j)
        if t == cfg.vision_end_token_id:
            inside_dropped = False
    index = torch.tensor(kept)
    new_positions = torch.zeros(4, 1, len(kept), dtype=torch.long)
    new_positions[0, 0] = torch.arange(len(kept))
    new_positions[1:, 0] = positions[:, 0, index]
    chosen = token_keep.nonzero().flatten()
    encoded = type(full)(pooler_output=(features[chosen],),
                         deepstack_features=[(torch.cat(level)[chosen],) for level in full.deepstack_features])
    return dict(input_ids=inputs["input_ids"][:, index], attention_mask=torch.ones(1, len(kept), dtype=torch.long),
                mm_token_type_ids=inputs["mm_token_type_ids"][:, index], position_ids=new_positions,
                mm_encoder_outputs={"image": encoded})


@pytest.mark.parametrize("method", ["none", "medpruner_budget", "uniform_slices", "topk", "visionzip", "evs"])
def test_selector_inside_the_model_equals_the_unpatched_model_on_the_selection(tiny, volume_inputs, method):
    model, _ = tiny
    inputs = dict(volume_inputs)
    budget = [11] if get_selector(method).budgeted else None
    policy = patch_with_selector(model, method, budgets=budget, settings=SETTINGS, config=_config())
    try:
        with torch.no_grad():
            pruned = model(**inputs).logits[:, -1]
        stats = model.medpruner_stats
    finally:
        remove_medpruner(model)
    (selection,) = policy.selections
    if budget is not None:
        assert selection.kept_tokens == 11 or method == "uniform_slices"
    per_slice = [int(selection.token_keep[6 * s: 6 * s + 6].sum()) for s in range(5)]
    assert stats.tokens_per_slice == [per_slice] and stats.slices_kept == [int(selection.slice_keep.sum())]
    # a dropped slice is never encoded: its features in the selection are zeros, and none of them is kept
    features = selection.features
    call = _explicit_call(model, inputs, selection.slice_keep, selection.token_keep, features)
    with torch.no_grad():
        expected = model(**call).logits[:, -1]
    torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-5)


def test_selection_is_the_selector_on_the_towers_own_scores(tiny, volume_inputs):
    """The pipeline hands the policy the adapter's encoding of every slice, per volume, with the token grid."""
    model, _ = tiny
    inputs = dict(volume_inputs)
    policy = patch_with_selector(model, "hiprune", budgets=[9], settings=SETTINGS, config=_config())
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        remove_medpruner(model)
    base = Qwen3VLAdapter()
    layout = base.layout(model, inputs)
    with torch.no_grad():
        encoded = base.encode(model, inputs, layout, None, 1, _config())
    slice_cu = torch.tensor(layout.token_offsets, dtype=torch.int32)
    expected = get_selector("hiprune").select(encoded.scores.float(), encoded.keys.float(), encoded.features,
                                              slice_cu, 9, grid=(2, 3))
    torch.testing.assert_close(policy.selections[0].token_keep, expected.token_keep, rtol=0, atol=0)


def test_medpruner_selector_in_the_model_is_apply_medpruner(tiny, volume_inputs):
    model, _ = tiny
    inputs = dict(volume_inputs)
    apply_medpruner(model, config=_config())
    try:
        with torch.no_grad():
            expected = model(**inputs).logits[:, -1]
        expected_stats = model.medpruner_stats
    finally:
        remove_medpruner(model)
    patch_with_selector(model, "medpruner", settings=SETTINGS, config=_config())
    try:
        with torch.no_grad():
            got = model(**inputs).logits[:, -1]
        stats = model.medpruner_stats
    finally:
        remove_medpruner(model)
    assert stats.tokens_per_slice == expected_stats.tokens_per_slice and stats.slices_kept == [3]
    assert 0 < stats.tokens_after < stats.tokens_before
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


OTHER_FAMILIES = {
    "qwen2_5_vl": (tiny_qwen2_5_vl, lambda: qwen_processor("qwen2_5_vl", clip_norm=True), qwen_volume_inputs),
    "gemma3": (tiny_gemma3, gemma_processor, gemma_volume_inputs),
}


def _logits_and_stats(model, inputs, patch):
    patch()
    try:
        with torch.no_grad():
            return model(**inputs).logits[:, -1], model.medpruner_stats
    finally:
        remove_medpruner(model)


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families(family):
    """Qwen2.5-VL (CLIP-normalised pixels, windowed tower) and Gemma3 (a fixed square token grid per image):
    the medpruner selector is apply_medpruner, none is the unpatched model, a budgeted method keeps its
    budget."""
    build_model, build_processor, volume_inputs = OTHER_FAMILIES[family]
    torch.manual_seed(0)
    model = build_model(seed=0)
    inputs = dict(volume_inputs(build_processor(), [synthetic_volume(4, seed=2)]))
    with torch.no_grad():
        unpatched = model(**inputs).logits[:, -1]
    expected, expected_stats = _logits_and_stats(model, inputs, lambda: apply_medpruner(model, config=_config()))
    got, stats = _logits_and_stats(
        model, inputs, lambda: patch_with_selector(model, "medpruner", settings=SETTINGS, config=_config()))
    assert stats.tokens_per_slice == expected_stats.tokens_per_slice and stats.slices_kept == [3]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    none, none_stats = _logits_and_stats(
        model, inputs, lambda: patch_with_selector(model, "none", settings=SETTINGS, config=_config()))
    assert none_stats.tokens_after == none_stats.tokens_before
    torch.testing.assert_close(none, unpatched, rtol=1e-4, atol=1e-5)
    budget = expected_stats.tokens_after
    _, hiprune_stats = _logits_and_stats(model, inputs, lambda: patch_with_selector(
        model, "hiprune", budgets=[budget], settings=SETTINGS, config=_config()))
    assert hiprune_stats.tokens_after == budget


def test_selector_policy_rejects_what_it_cannot_run(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="needs budgets"):
        SelectorPolicy("topk")
    with pytest.raises(ValueError, match="method must be one of"):
        SelectorPolicy("nope")
    with pytest.raises(ValueError, match="fast mode"):
        patch_with_policy(model, SelectorPolicy("medpruner"), MedPrunerConfig(mode="paper"))
    with pytest.raises(TypeError, match="no adapter"):
        patch_with_policy(torch.nn.Linear(2, 2), SelectorPolicy("none"), MedPrunerConfig())


# ----------------------------------------------------------------------------------------- the runner
def _dataset(tmp_path, count=3):
    rng = np.random.default_rng(0)
    for i in range(count):
        volume = rng.random((5, 32, 48), dtype=np.float32)
        volume[2] = volume[1]
        np.save(tmp_path / f"v{i}.npy", volume)
    lines = [
        {"volume": "v0.npy", "question": "Which organ?", "options": {"A": "liver", "B": "spleen"}, "answer": "liver",
         "answer_letter": "A", "category": "organ", "id": "s0"},
        {"volume": "v1.npy", "question": "Which side?", "options": ["left", "right"], "answer": "right",
         "category": "side", "id": "s1"},
        {"volume": "v2.npy", "question": "Which organ here?", "options": ["kidney", "lung"], "answer": "lung",
         "category": "organ", "id": "s2"},
    ][:count]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return read_dataset(tmp_path / "data.jsonl", "jsonl")


class _Counting:
    def __init__(self, model, processor):
        self.calls = 0
        self.model, self.processor = model, processor

    def __call__(self, volume, prompt):
        self.calls += 1
        return qwen_volume_inputs(self.processor, [torch.from_numpy(volume)], prompt)


def _eval_model(tiny):
    model, processor = tiny
    counter = _Counting(model, processor)
    return EvalModel(model, processor, "tiny", counter), counter


def _settings(methods=ALL_METHODS, **overrides):
    values = dict(methods=methods, backend=BACKEND, max_new_tokens=2, bootstrap=20, **SETTINGS)
    values.update(overrides)
    return EvalSettings(**values)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    dataset = _dataset(out)
    eval_model, _ = _eval_model(tiny)
    summary = run_eval(dataset, eval_model, _settings(), out / "out", progress=False)
    return dataset, summary, out / "out"


def test_every_method_runs_at_the_adaptive_medpruners_budget(full_run):
    dataset, summary, out = full_run
    records = read_records(out / RECORDS_NAME)
    assert len(records) == len(dataset) * len(ALL_METHODS)
    assert len({r["key"] for r in records}) == len(records)
    by = {(r["sample_id"], r["method"]): r for r in records}
    for sample in dataset:
        adaptive = by[sample.sample_id, "medpruner"]
        assert adaptive["budget"] is None and 0 < adaptive["tokens_kept"] < adaptive["tokens_total"] == 30
        for method in ALL_METHODS:
            record = by[sample.sample_id, method]
            assert record["tokens_total"] == 30 and record["slices_total"] == 5
            assert record["retention"] == pytest.approx(record["tokens_kept"] / 30)
            assert record["slice_stage_retention"] * record["token_stage_retention"] == pytest.approx(
                record["retention"])
            assert sum(record["tokens_per_slice"]) == record["tokens_kept"]
            if get_selector(method).budgeted:
                assert record["budget"] == adaptive["tokens_kept"]
                gap = abs(record["tokens_kept"] - record["budget"])
                # uniform slice sampling keeps whole slices: within half a slice (6 tokens) of the budget
                assert gap <= 3 if method == "uniform_slices" else gap == 0
            if method in SLICE_ONLY:
                assert record["token_stage_retention"] == 1.0
            if method in TOKEN_ONLY or method == "none":
                assert record["slices_kept"] == 5 and record["slice_stage_retention"] == 1.0
        assert by[sample.sample_id, "none"]["tokens_kept"] == 30
    assert all(entry["n"] == len(dataset) for entry in summary["methods"].values())
    assert summary["methods"]["topk"]["budget_match"]["max_abs_gap"] == 0
    assert summary["methods_added"] == [] and summary["methods_run"][:2] == ["none", "medpruner"]


def test_records_match_the_pipeline_and_the_unpatched_model(tiny, full_run):
    """The medpruner record is what apply_medpruner keeps on the same inputs, and the reference and the
    first-token KL are the unpatched and pruned generates' own."""
    dataset, _, out = full_run
    model, processor = tiny
    by = {(r["sample_id"], r["method"]): r for r in read_records(out / RECORDS_NAME)}
    sample = dataset.samples[0]
    inputs = qwen_volume_inputs(processor, [torch.from_numpy(sample.load())], build_prompt(sample))

    def first_logits():
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        text = processor.tokenizer.decode(output.sequences[0, inputs["input_ids"].shape[1]:],
                                          skip_special_tokens=True).strip()
        return output.logits[0][0].double(), text

    reference, reference_text = first_logits()
    apply_medpruner(model, config=_config())
    try:
        pruned, pruned_text = first_logits()
        stats = model.medpruner_stats
    finally:
        remove_medpruner(model)
    record = by[sample.sample_id, "medpruner"]
    assert record["tokens_per_slice"] == stats.tokens_per_slice[0]
    assert record["kept_slices"] == [i for i, n in enumerate(stats.tokens_per_slice[0]) if n > 0]
    assert by[sample.sample_id, "none"]["prediction"] == reference_text and record["prediction"] == pruned_text
    log_p, log_q = torch.log_softmax(reference, 0), torch.log_softmax(pruned, 0)
    assert record["first_token_kl"] == pytest.approx(float((log_p.exp() * (log_p - log_q)).sum()), rel=1e-3,
                                                     abs=1e-7)
    assert record["top1"] == int(pruned.argmax()) and record["reference_top1"] == int(reference.argmax())


def test_the_audit_is_in_the_summary_and_the_report(full_run):
    dataset, summary, out = full_run
    records = read_records(out / RECORDS_NAME)
    reference = [r for r in records if r["method"] == "none"]
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and (out / "pareto.png").stat().st_size > 0
    for method in ALL_METHODS:
        if method == "none":
            assert "audit" not in summary["methods"][method]
            continue
        mine = [r for r in records if r["method"] == method]
        found = summary["methods"][method]["audit"]
        assert found["category_deltas"] == audit.category_deltas(mine, reference)
        assert found["answer_flips"] == audit.answer_flips(mine, reference)
        fidelity = found["fidelity"]
        assert fidelity["n"] == fidelity["n_logits"] == len(dataset)
        assert fidelity["first_token_kl"] == pytest.approx(np.mean([r["first_token_kl"] for r in mine]))
        assert fidelity["top1_agreement"] == pytest.approx(np.mean([r["top1"] == r["reference_top1"] for r in mine]))
        organ = [r for r in mine if r["category"] == "organ"]
        assert fidelity["by_category"]["organ"]["first_token_kl"] == pytest.approx(
            np.mean([r["first_token_kl"] for r in organ]))
        for flip in found["answer_flips"]:
            assert f"<td>{flip['sample_id']}</td>" in page
            assert f"<td>{' '.join(map(str, flip['kept_slices']))}</td>" in page
        assert f"<h3>{method}</h3>" in page
    assert [row["category"] for row in summary["methods"]["topk"]["audit"]["category_deltas"]] == ["side", "organ"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["methods"]["evs"]["audit"]["fidelity"] == summary["methods"]["evs"]["audit"]["fidelity"]
    assert saved["dataset"]["samples"] == len(dataset) and "environment" in saved


def test_resume_skips_finished_samples_and_repairs_a_cut_line(tiny, tmp_path):
    dataset = _dataset(tmp_path)
    methods = ("topk",)
    eval_model, counter = _eval_model(tiny)
    out = tmp_path / "out"
    run_eval(dataset, eval_model, _settings(methods, limit=1), out, progress=False, html=False)
    first = (out / RECORDS_NAME).read_text().splitlines()
    assert counter.calls == 1 and len(first) == 3  # none and medpruner added

    # an interruption cut the second sample's last record short
    run_eval(dataset, eval_model, _settings(methods, limit=2), out, progress=False, html=False)
    lines = (out / RECORDS_NAME).read_text().splitlines()
    (out / RECORDS_NAME).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
    counter.calls = 0
    summary = run_eval(dataset, eval_model, _settings(methods), out, progress=False, html=False)
    assert counter.calls == 2  # the half-done second sample and the new third one
    records = read_records(out / RECORDS_NAME)
    assert [json.dumps(r) for r in records[:3]] == [json.dumps(json.loads(line)) for line in first]
    assert len(records) == 9 and len({r["key"] for r in records}) == 9
    assert records[:5] == [json.loads(line) for line in lines[:5]]
    # the lost record is computed again, at the stored medpruner budget, equal to the first time's
    redone = json.loads(lines[5])
    for record in (redone, records[5]):
        record.pop("seconds"), record.pop("seconds_split")
    assert records[5] == redone and redone["budget"] == records[4]["tokens_kept"]
    assert all(entry["n"] == 3 for entry in summary["methods"].values())

    counter.calls = 0
    run_eval(dataset, eval_model, _settings(methods), out, progress=False, html=False)
    assert counter.calls == 0 and len(read_records(out / RECORDS_NAME)) == 9

    # other settings are refused, nothing written; asked for, new records go beside the old ones, and only
    # the new ones are summarised
    with pytest.raises(ValueError, match="holds records of other settings .*tau 0.5 -> 0.7"):
        run_eval(dataset, eval_model, _settings(methods, tau=0.7, limit=1), out, progress=False, html=False)
    assert len(read_records(out / RECORDS_NAME)) == 9
    summary = run_eval(dataset, eval_model, _settings(methods, tau=0.7, limit=1, allow_other_settings=True), out,
                       progress=False, html=False)
    records = read_records(out / RECORDS_NAME)
    assert len(records) == 12 and len({r["settings_id"] for r in records}) == 2
    assert all(entry["n"] == 1 for entry in summary["methods"].values())


class _Replay:
    """An engine replaying the records of another run, the samples in reverse order, some failing."""

    name, label = "tiny", "replay"

    def __init__(self, records, failing):
        self.records, self.failing, self.pending = records, failing, None

    def restrict(self, plan):
        return plan

    def run(self, plan, pending, settings):
        self.pending = [sample.sample_id for _, sample in pending]
        for index, sample in reversed(pending):
            if sample.sample_id in self.failing:
                yield EngineEvent(failure=(index, {"sample_id": sample.sample_id, "reason": "replayed"}), finished=1)
                continue
            yield EngineEvent(records=[r for r in self.records if r["sample_id"] == sample.sample_id], finished=1)


def test_the_driver_writes_what_any_engine_yields_and_resumes_it(full_run, tmp_path):
    """drive_eval over an engine that is not the HF one: every record written once, as it arrives (to
    ``write`` or the records file), the failures in dataset order, the summary over the plan's samples;
    a rerun hands the engine only the samples without records."""
    dataset, summary, out = full_run
    records = read_records(out / RECORDS_NAME)
    written = []
    got = drive_eval(dataset, _Replay(records, {"s0", "s2"}), _settings(), tmp_path / "a", progress=False,
                     html=False, write=written.append)
    assert written == [r for r in records if r["sample_id"] == "s1"]
    assert not (tmp_path / "a" / RECORDS_NAME).exists()
    assert [f["sample_id"] for f in got["failed_samples"]] == ["s0", "s2"]
    assert all(entry["n"] == 1 for entry in got["methods"].values())

    engine = _Replay(records, {"s2"})
    got = drive_eval(dataset, engine, _settings(), tmp_path / "b", progress=False, html=False)
    assert read_records(tmp_path / "b" / RECORDS_NAME) == [r for s in ("s1", "s0") for r in records
                                                          if r["sample_id"] == s]
    again = _Replay(records, set())
    got = drive_eval(dataset, again, _settings(), tmp_path / "b", progress=False, html=False)
    assert again.pending == ["s2"] and got["failed_samples"] == []
    assert {k: v["retention"] for k, v in got["methods"].items()} == {
        k: v["retention"] for k, v in summary["methods"].items()}


def test_a_volume_that_fails_to_load_is_counted_and_the_run_goes_on(tiny, tmp_path):
    dataset = _dataset(tmp_path, count=2)
    (tmp_path / "v0.npy").write_bytes(b"not an array")
    eval_model, _ = _eval_model(tiny)
    summary = run_eval(dataset, eval_model, _settings(("iaf",)), tmp_path / "out", progress=False, html=False)
    assert [f["sample_id"] for f in summary["failed_samples"]] == ["s0"]
    assert "v0.npy" in summary["failed_samples"][0]["reason"]
    assert summary["methods"]["iaf"]["n"] == 1


def test_duplicate_sample_ids_are_refused(tiny, tmp_path):
    dataset = _dataset(tmp_path, count=2)
    dataset.samples[1].sample_id = "s0"
    eval_model, _ = _eval_model(tiny)
    with pytest.raises(ValueError, match=r"sample ids must be unique, repeated: \['s0'\]"):
        run_eval(dataset, eval_model, _settings(("iaf",)), tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------- helpers
def test_resolve_methods_adds_the_reference_and_the_budget_source():
    assert resolve_methods(["topk", "iaf", "topk"]) == (["none", "medpruner", "topk", "iaf"], ["none", "medpruner"])
    assert resolve_methods(["iaf"]) == (["none", "iaf"], ["none"])
    assert resolve_methods(["medpruner", "none"]) == (["none", "medpruner"], [])
    with pytest.raises(ValueError, match="method must be one of"):
        resolve_methods(["iaf", "fastv"])
    with pytest.raises(ValueError, match="at least one"):
        resolve_methods([])


def _sample(question, options=None, letter=None):
    return Sample("x", question, "a", "c", VolumeRef(), "f: row 1", options or {}, letter)


def test_build_prompt():
    assert build_prompt(_sample("Describe.")) == "Describe."
    assert build_prompt(_sample("Which?", {"A": "liver", "B": "lung"}, "A")) == (
        "Which?\nA. liver\nB. lung\nAnswer with the option's letter.")
    listed = "Which?\nA. liver\n(B) lung"
    assert build_prompt(_sample(listed, {"A": "liver", "B": "lung"})) == listed + "\nAnswer with the option's letter."
    assert build_prompt(_sample("Which?", letter="C")) == "Which?\nAnswer with the option's letter."
    own_format = "Which?\nA. liver\nB. lung\nAnswer with the letter."
    assert build_prompt(_sample(own_format, {"A": "liver", "B": "lung"}, "B")) == own_format
    unlisted = "Which?\nAnswer with the letter."
    assert build_prompt(_sample(unlisted, {"A": "liver", "B": "lung"})) == (
        "Which?\nAnswer with the letter.\nA. liver\nB. lung\nAnswer with the option's letter.")


def test_read_records_cuts_only_an_unfinished_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    assert read_records(path) == []
    path.write_text('{"a": 1}\n{"b": 2}\n{"c"')
    assert read_records(path) == [{"a": 1}, {"b": 2}] and path.read_text() == '{"a": 1}\n{"b": 2}\n'
    path.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_records(path)


def test_pareto_front():
    points = [("a", 1.0, 0.9), ("b", 0.5, 0.9), ("c", 0.2, 0.5), ("d", 0.5, 0.4), ("e", 0.2, 0.5)]
    # b dominates a (less retention, same score) and d; c and e tie, neither dominates the other
    assert pareto_front(points) == ["c", "e", "b"]
    assert pareto_front([("only", 0.3, 0.1)]) == ["only"]
