"""attention_importance against the float64 eager-softmax reference, on every backend here."""

import itertools

import pytest
import torch
from conftest import DEVICE, available_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medpruner_kernels import importance as importance_module
from medpruner_kernels import reference
from medpruner_kernels.importance import attention_importance

# The C++ kernel is CPU-only: on a GPU machine the cpp backend is not one of this op's CUDA paths.
BACKENDS = [
    b for b in available_backends(cpp_ops=importance_module.CPP_OPS) if b != "cpp" or DEVICE.type == "cpu"
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Every backend accumulates in float32 whatever the input dtype, so the absolute floor (relative to the
# largest score) only has to absorb float32 rounding over a segment; the main bound is the 2x rule.
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-5, torch.bfloat16: 1e-5}
HEAD_DIMS = [72, 80, 64, 128, 40]
# Interpreted Triton is slow: the shapes below stay at ~100 tokens and 2 heads.
STRUCTURES = {
    "one-segment": [96],
    "varlen-1-token": [1, 30, 1, 0, 17, 1, 26],
    "many-segments": [5, 3, 8, 4, 6, 7, 2, 9, 5, 3, 4, 8],
}
# Lengths that are multiples of 4 (Qwen's 2x2 merge blocks), including 4-token segments.
GROUPED_STRUCTURES = {
    "one-segment": [96],
    "varlen-4-token": [4, 32, 0, 4, 24],
    "many-segments": [8, 4, 12, 8, 4, 16, 8, 4],
}


# ------------------------------------------------------------------------------------------ helpers
def cu_of(lengths, device=DEVICE):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def random_qk(num_tokens, num_heads, head_dim, dtype, spread=1.0):
    q = torch.randn(num_tokens, num_heads, head_dim) * spread
    k = torch.randn(num_tokens, num_heads, head_dim) * spread
    return q.to(dtype).to(DEVICE), k.to(dtype).to(DEVICE)


def eager_in_dtype(q, k, cu, scale, group):
    """What torch computes when the dense softmax runs in the inputs' own dtype: the yardstick of the
    low-precision rule."""
    received = torch.zeros(q.shape[0], dtype=q.dtype)
    q, k = q.cpu(), k.cpu()
    for start, end in reference.segments(cu.cpu()):
        if end > start:
            qs, ks = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1)
            probs = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
            received[start:end] = probs.mean(dim=0).sum(dim=0)
    return received.reshape(-1, group).mean(dim=1) if group > 1 else received


def assert_matches_reference(got, q, k, cu, *, scale=None, group=1):
    scale = q.shape[2] ** -0.5 if scale is None else scale
    expected = reference.attention_importance(q.cpu(), k.cpu(), cu.cpu(), scale=scale, group=group)
    assert got.dtype == torch.float32
    assert got.shape == (q.shape[0] // group,)
    error = (got.cpu().double() - expected).abs().max().item() if expected.numel() else 0.0
    own = (
        (eager_in_dtype(q, k, cu, scale, group).double() - expected).abs().max().item()
        if expected.numel()
        else 0
    )
    magnitude = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    bound = 2 * own + FLOOR[q.dtype] * magnitude
    assert error <= bound, f"max error {error:.3g} > {bound:.3g} (torch's own {q.dtype} error {own:.3g})"
    return expected


# ------------------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_random_inputs_every_head_dim(backend, dtype, head_dim):
    lengths = [40, 1, 23, 0, 16]
    q, k = random_qk(sum(lengths), 2, head_dim, dtype)
    cu = cu_of(lengths)
    got = attention_importance(q, k, cu_seqlens=cu, backend=backend)
    assert_matches_reference(got, q, k, cu)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("structure", list(STRUCTURES))
def test_segment_structures(backend, dtype, structure):
    lengths = STRUCTURES[structure]
    q, k = random_qk(sum(lengths), 3, 72, dtype, spread=1.5)
    cu = cu_of(lengths)
    got = attention_importance(q, k, cu_seqlens=cu, backend=backend)
    assert_matches_reference(got, q, k, cu)
    # A 1-token segment attends only to itself.
    for start, end in reference.segments(cu.cpu()):
        if end - start == 1:
            assert got[start].item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("structure", list(GROUPED_STRUCTURES))
@pytest.mark.parametrize("group", [1, 4])
def test_group_averages_consecutive_tokens(backend, dtype, structure, group):
    lengths = GROUPED_STRUCTURES[structure]
    q, k = random_qk(sum(lengths), 2, 80, dtype)
    cu = cu_of(lengths)
    got = attention_importance(q, k, cu_seqlens=cu, group=group, backend=backend)
    assert_matches_reference(got, q, k, cu, group=group)
    if group > 1:
        ungrouped = attention_importance(q, k, cu_seqlens=cu, backend=backend)
        torch.testing.assert_close(got, ungrouped.reshape(-1, group).mean(dim=1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 4])
def test_segment_scores_sum_to_segment_length(backend, dtype, group):
    lengths = [36, 4, 0, 8, 52]
    q, k = random_qk(sum(lengths), 4, 64, dtype, spread=2.0)
    cu = cu_of(lengths)
    got = attention_importance(q, k, cu_seqlens=cu, group=group, backend=backend).cpu().double()
    assert bool((got >= 0).all())
    starts = cu.cpu().tolist()
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        total = got[start // group : end // group].sum().item() * group
        assert total == pytest.approx(end - start, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_segment_and_explicit_scale(backend):
    q, k = random_qk(64, 2, 40, torch.float32)
    whole = cu_of([64])
    torch.testing.assert_close(
        attention_importance(q, k, backend=backend),
        attention_importance(q, k, cu_seqlens=whole, backend=backend),
    )
    for scale in (0.0, 0.03, 1.0):
        got = attention_importance(q, k, scale=scale, backend=backend)
        assert_matches_reference(got, q, k, whole, scale=scale)


# ------------------------------------------------------------------------------- structured inputs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_peaked_attention_on_a_sink_token(backend, dtype):
    # Every query points at token 0 of its segment (ViTs' attention sink): it receives almost all the
    # attention; logits reach ~50, so the row max subtraction matters.
    lengths, head_dim = [48, 33], 64
    q, k = random_qk(sum(lengths), 2, head_dim, torch.float32, spread=0.3)
    cu = cu_of(lengths)
    for start, length in zip((0, 48), lengths, strict=True):
        sink = k[start].clone()
        k[start] = sink * 6
        q[start : start + length] += sink / sink.norm(dim=-1, keepdim=True) * 8
    q, k = q.to(dtype), k.to(dtype)
    got = attention_importance(q, k, cu_seqlens=cu, backend=backend)
    assert_matches_reference(got, q, k, cu)
    for start, length in zip((0, 48), lengths, strict=True):
        segment = got[start : start + length].cpu()
        assert int(segment.argmax()) == 0
        assert segment[0].item() > 0.9 * length


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_uniform_attention_gives_every_token_one(backend, dtype):
    # q = 0: every row is uniform over its segment, so every key receives exactly length * (1/length).
    lengths = [17, 1, 40, 6]
    _, k = random_qk(sum(lengths), 3, 72, dtype)
    q = torch.zeros_like(k)
    got = attention_importance(q, k, cu_seqlens=cu_of(lengths), backend=backend)
    torch.testing.assert_close(got.cpu(), torch.ones(sum(lengths)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_keys_receive_equal_attention(backend):
    lengths = [50, 30]
    q, k = random_qk(sum(lengths), 2, 80, torch.float32)
    k[10] = k[3]
    k[20:30] = k[40]  # a run of duplicates, also duplicating a key of the other segment
    cu = cu_of(lengths)
    got = attention_importance(q, k, cu_seqlens=cu, backend=backend).cpu()
    assert_matches_reference(got, q, k, cu)
    assert got[10].item() == pytest.approx(got[3].item(), rel=1e-6)
    torch.testing.assert_close(got[20:30], got[20].expand(10), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_qkv_views_are_read_in_place(backend):
    # q and k as slices of the fused qkv projection [N, 3, H, Dh] and of a [N, 3 * H * Dh] buffer.
    lengths, heads, head_dim = [30, 1, 25], 2, 72
    n = sum(lengths)
    cu = cu_of(lengths)
    qkv = torch.randn(n, 3, heads, head_dim, device=DEVICE)
    flat = torch.randn(n, 3 * heads * head_dim, device=DEVICE)
    views = {
        "qkv[:, 0]/qkv[:, 1]": (qkv[:, 0], qkv[:, 1]),
        "flat column blocks": (
            flat[:, : heads * head_dim].view(n, heads, head_dim),
            flat[:, heads * head_dim : 2 * heads * head_dim].view(n, heads, head_dim),
        ),
        "head-major transposed": (
            qkv[:, 0].transpose(0, 1).contiguous().transpose(0, 1),
            qkv[:, 1].transpose(0, 1).contiguous().transpose(0, 1),
        ),
    }
    for name, (q, k) in views.items():
        assert not q.is_contiguous(), name
        got = attention_importance(q, k, cu_seqlens=cu, backend=backend)
        torch.testing.assert_close(
            got,
            attention_importance(q.contiguous(), k.contiguous(), cu_seqlens=cu, backend=backend),
            msg=name,
        )
        assert_matches_reference(got, q, k, cu)


STRIDE_UNIT_VIEWS = {
    # name: (row stride, head stride, channel stride of q and k, the unit the Triton path uses per dtype)
    "contiguous Dh=72": ((2 * 72, 72, 1), {torch.float32: 4, torch.bfloat16: 8}),
    "fused qkv rows": ((3 * 2 * 72, 72, 1), {torch.float32: 4, torch.bfloat16: 8}),
    "rows 4 elements apart from a unit": ((2 * 72 + 4, 72, 1), {torch.float32: 4, torch.bfloat16: 1}),
    "odd row stride": ((2 * 72 + 3, 72, 1), {torch.float32: 1, torch.bfloat16: 1}),
    "odd head stride": ((2 * 75, 75, 1), {torch.float32: 1, torch.bfloat16: 1}),
    "channels 2 apart": ((2 * 144, 144, 2), {torch.float32: 1, torch.bfloat16: 1}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("view", list(STRIDE_UNIT_VIEWS))
def test_strides_with_and_without_a_16_byte_unit(backend, dtype, view):
    # The Triton kernels take row/head strides in units of 16 bytes when every one is a multiple of it
    # (provably aligned vector loads) and element strides otherwise: both launches against float64.
    strides, units = STRIDE_UNIT_VIEWS[view]
    lengths, heads, head_dim = [23, 1, 16], 2, 72
    n = sum(lengths)
    cu = cu_of(lengths)
    size = (n - 1) * strides[0] + (heads - 1) * strides[1] + (head_dim - 1) * strides[2] + 1
    storage = torch.randn(2 * size, device=DEVICE).to(dtype)
    q = storage.as_strided((n, heads, head_dim), strides, 0)
    k = storage.as_strided((n, heads, head_dim), strides, size)
    if backend == "triton":
        assert importance_module._stride_unit(q, k) == units[dtype]
    got = attention_importance(q, k, cu_seqlens=cu, backend=backend)
    assert_matches_reference(got, q, k, cu)


def test_stride_unit_needs_both_q_and_k():
    q = torch.randn(8, 2, 72, dtype=torch.bfloat16)
    k_odd = torch.randn(8, 2 * 72 + 1, dtype=torch.bfloat16)[:, : 2 * 72].view(8, 2, 72)
    assert importance_module._stride_unit(q, q) == 8
    assert importance_module._stride_unit(q, k_odd) == 1
    assert importance_module._stride_unit(k_odd, q) == 1


# Element offsets past 2**31 (int32 overflow in the kernels' address arithmetic): views over one
# torch.empty storage of ~2.7e9 elements. Only the pages the views write and read are ever touched, so
# the test costs a few MiB whatever the storage's size.
HUGE_LAYOUTS = {
    # q/k as the column blocks of a fused qkv row 2**27 elements long: row 16 starts past 2**31.
    "rows-2**27-apart": dict(rows=20, row_stride=2**27, head_stride=None),
    # head-major: head h starts at h * 2**30, so head 2 lies past 2**31.
    "heads-2**30-apart": dict(rows=24, row_stride=None, head_stride=2**30),
}


def huge_views(rows, row_stride, head_stride, heads, head_dim, dtype):
    if row_stride is not None:
        size, strides, k_offset = rows * row_stride, (row_stride, head_dim, 1), heads * head_dim
    else:
        size, strides, k_offset = heads * head_stride, (head_dim, head_stride, 1), rows * head_dim
    storage = torch.empty(size, dtype=dtype, device=DEVICE)
    q = storage.as_strided((rows, heads, head_dim), strides, 0)
    k = storage.as_strided((rows, heads, head_dim), strides, k_offset)
    fresh_q, fresh_k = random_qk(rows, heads, head_dim, dtype)
    q.copy_(fresh_q)
    k.copy_(fresh_k)
    last = k_offset + (rows - 1) * strides[0] + (heads - 1) * strides[1] + head_dim - 1
    assert last >= 2**31, "the views must reach past 2**31 elements"
    return q, k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(HUGE_LAYOUTS))
def test_element_offsets_past_2_31(backend, dtype, layout):
    heads, head_dim = 3, 8
    q, k = huge_views(**HUGE_LAYOUTS[layout], heads=heads, head_dim=head_dim, dtype=dtype)
    rows = q.shape[0]
    # Two segments, each with rows on both sides of 2**31 (and of the head boundary).
    cu = cu_of([rows // 2 + 3, rows - rows // 2 - 3])
    got = attention_importance(q, k, cu_seqlens=cu, group=1, backend=backend)
    assert_matches_reference(got, q, k, cu)
    torch.testing.assert_close(
        got, attention_importance(q.contiguous(), k.contiguous(), cu_seqlens=cu, backend=backend)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_runs_are_bitwise_equal(backend):
    lengths = [45, 2, 39]
    q, k = random_qk(sum(lengths), 3, 40, torch.float16)
    cu = cu_of(lengths)
    first = attention_importance(q, k, cu_seqlens=cu, group=1, backend=backend)
    second = attention_importance(q, k, cu_seqlens=cu, group=1, backend=backend)
    assert torch.equal(first, second)


def test_backends_agree_with_each_other():
    lengths = [33, 1, 60, 10]
    q, k = random_qk(sum(lengths), 2, 128, torch.bfloat16)
    cu = cu_of(lengths)
    results = {b: attention_importance(q, k, cu_seqlens=cu, backend=b) for b in BACKENDS}
    for backend, got in results.items():
        torch.testing.assert_close(got, results["torch"], rtol=1e-5, atol=1e-5, msg=backend)


def test_no_tokens():
    q = torch.zeros(0, 2, 8, device=DEVICE)
    for backend in BACKENDS:
        assert attention_importance(q, q, backend=backend).shape == (0,)


# ------------------------------------------------------------------------------------- properties
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    blocks=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    group=st.sampled_from([1, 2, 4]),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 48),
    dtype=st.sampled_from(DTYPES),
    spread=st.sampled_from([0.0, 0.5, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_property_all_backends_match_reference(blocks, group, heads, head_dim, dtype, spread, seed):
    torch.manual_seed(seed)
    lengths = [b * group for b in blocks]
    q, k = random_qk(sum(lengths), heads, head_dim, dtype, spread)
    cu = cu_of(lengths)
    for backend in BACKENDS:
        got = attention_importance(q, k, cu_seqlens=cu, group=group, backend=backend)
        assert_matches_reference(got, q, k, cu, group=group)


# ----------------------------------------------------------------------------------- bad input
def _qk(n=8, h=2, d=4, dtype=torch.float32):
    return torch.randn(n, h, d, dtype=dtype), torch.randn(n, h, d, dtype=dtype)


def _nan_q():
    q, k = _qk()
    q[3, 1, 2] = float("nan")
    return q, k


def _inf_k():
    q, k = _qk()
    k[0, 0, 0] = float("inf")
    return q, k


I32 = torch.int32


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: attention_importance(torch.randn(8, 4), torch.randn(8, 4)), ValueError, "q must be"),
        (lambda: attention_importance(torch.randn(2, 8, 2, 4), torch.randn(2, 8, 2, 4)), ValueError, "q must be"),
        (lambda: attention_importance(_qk()[0], torch.randn(9, 2, 4)), ValueError, "k must have"),
        (lambda: attention_importance(_qk()[0], torch.randn(8, 3, 4)), ValueError, "k must have"),
        (lambda: attention_importance(_qk()[0], torch.randn(8, 2, 5)), ValueError, "k must have"),
        (lambda: attention_importance(torch.randn(8, 0, 4), torch.randn(8, 0, 4)), ValueError, "q needs"),
        (lambda: attention_importance(*_qk(dtype=torch.float64)), TypeError, "q has unsupported dtype"),
        (lambda: attention_importance(_qk()[0].int(), _qk()[1]), TypeError, "q has unsupported dtype"),
        (lambda: attention_importance(_qk()[0], _qk()[1].half()), TypeError, "k has dtype"),
        (lambda: attention_importance(_qk()[0], [[1.0]]), TypeError, "k must be a torch.Tensor"),
        (lambda: attention_importance(*_nan_q()), ValueError, "q contains NaN"),
        (lambda: attention_importance(*_inf_k()), ValueError, "k contains NaN or Inf"),
        (lambda: attention_importance(*_qk(), group=0), ValueError, "group"),
        (lambda: attention_importance(*_qk(), group=3), ValueError, "group"),
        (lambda: attention_importance(*_qk(), group=2.0), TypeError, "group"),
        (lambda: attention_importance(*_qk(), group=True), TypeError, "group"),
        (lambda: attention_importance(*_qk(), group=4, cu_seqlens=torch.tensor([0, 2, 8], dtype=I32)),
         ValueError, "multiple of group"),
        (lambda: attention_importance(*_qk(), scale="0.5"), TypeError, "scale"),
        (lambda: attention_importance(*_qk(), scale=torch.tensor(0.5)), TypeError, "scale"),
        (lambda: attention_importance(*_qk(), scale=float("inf")), ValueError, "scale"),
        (lambda: attention_importance(*_qk(), scale=float("nan")), ValueError, "scale"),
        (lambda: attention_importance(*_qk(), cu_seqlens=torch.tensor([0, 7], dtype=I32)), ValueError, "cu_seqlens"),
        (lambda: attention_importance(*_qk(), cu_seqlens=torch.tensor([1, 8], dtype=I32)), ValueError, "cu_seqlens"),
        (lambda: attention_importance(*_qk(), cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=I32)),
         ValueError, "cu_seqlens"),
        (lambda: attention_importance(*_qk(), cu_seqlens=torch.tensor([[0, 8]], dtype=I32)), ValueError, "cu_seqlens"),
        (lambda: attention_importance(*_qk(), cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, "cu_seqlens"),
        (lambda: attention_importance(*_qk(), cu_seqlens=[0, 8]), TypeError, "cu_seqlens"),
        (lambda: attention_importance(*_qk(), backend="cuda"), ValueError, "backend"),
    ],
)  # fmt: skip
def test_bad_input_is_rejected_with_the_argument_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unavailable_explicit_backend_raises(monkeypatch):
    from medpruner_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "CPP_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="compiled extension"):
        attention_importance(*_qk(), backend="cpp")


# ------------------------------------------------------------------------- torch.library plumbing
def _op_args(device=DEVICE):
    q, k = random_qk(24, 2, 40, torch.float32)
    return (q.to(device), k.to(device), cu_of([10, 2, 12], device), 40**-0.5, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """One registered op whose last argument names the backend; every backend passes every utility."""
    torch.library.opcheck(torch.ops.medpruner.attention_importance, (*_op_args(), backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    lengths = [20, 4, 16]
    q, k = random_qk(sum(lengths), 2, 72, torch.float32)
    cu = cu_of(lengths)

    def score(q, k):
        return attention_importance(q, k, cu_seqlens=cu, group=4, backend=backend)

    compiled = torch.compile(score, fullgraph=True, backend="eager" if DEVICE.type == "cpu" else "inductor")
    torch.testing.assert_close(compiled(q, k), score(q, k))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
def test_cpp_result_does_not_depend_on_the_thread_count():
    lengths = [70, 3, 41]
    q, k = random_qk(sum(lengths), 4, 72, torch.float32)
    cu = cu_of(lengths)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = attention_importance(q, k, cu_seqlens=cu, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, attention_importance(q, k, cu_seqlens=cu, backend="cpp"))
