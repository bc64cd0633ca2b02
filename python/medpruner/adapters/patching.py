"""The patching of a Hugging Face model instance: :meth:`~medpruner.adapters.base.Adapter.patch` puts a
:class:`PatchedMethod` on the instance's ``forward`` and ``generate``, which run the adapter's pruning
pipeline (:mod:`medpruner.adapters.base`) on a prunable request and hand the pruned call to the original
method; :func:`unpatch` puts back exactly what the instance held.

A cache filled by a pruned request carries a :class:`PromptRecord`, so a later call that continues it
(forward with new tokens, or generate with the whole sequence) is rewritten onto the pruned prompt the
cache holds; generate's output gets the caller's unpruned prompt back, and ``max_length`` keeps the
caller's budget of new tokens. generate's own forward calls are already in pruned coordinates and pass
through untouched: they carry no pixels, and a continued cache's record is taken off it while the
original generate runs.

``torch.compile``: the patched methods' own frames are skipped by Dynamo (``recursive=False``: the frames
they call are compiled), and the pruning stage runs eagerly (``torch.compiler.disable``), so a compiled
model, ``fullgraph`` and the static-cache compiled decoding of ``generate`` included, compiles exactly
the original ``forward`` on the pruned call. Nothing request-scoped lives in ambient state.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from medpruner_kernels._validation import close_scope, open_scope, raise_pending_errors

# Dynamo skips the patched methods' frames but traces what they call: the scope's context variable
# must stay out of its sight.
_open_scope = torch.compiler.disable(open_scope)
_close_scope = torch.compiler.disable(close_scope)

_PATCH_ATTR = "_medpruner_patch"
_PATCHED_NAMES = ("forward", "generate")
# forward arguments that ask the vision tower for more outputs (returned with the image outputs)
TOWER_OUTPUT_FLAGS = ("output_hidden_states", "output_attentions")


@dataclass
class PromptRecord:
    """What a cache filled by a pruned request needs to be continued (attached to the cache object):
    the caller's prompt, the pruned prompt the cache holds, and the family's position state (Qwen:
    the rope deltas). Rows are the request's rows; an expanded generate repeats each row."""

    original_input_ids: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    type_ids: torch.Tensor | None
    position_state: Any


class PatchedMethod:
    """A patched instance's ``forward`` / ``generate``. It holds the model it belongs to as plain state
    (no closure), so ``copy.deepcopy`` and pickling rebind it to the copy, which then runs its own
    weights; the adapter, config and original method are looked up on that model at each call."""

    def __init__(self, model, name: str) -> None:
        self.model = model
        self.name = name

    # Dynamo skips this frame (not the frames it calls): a compiled model compiles the original forward
    @torch.compiler.disable(recursive=False)
    def __call__(self, *args, **kwargs):
        call = _patched_forward if self.name == "forward" else _patched_generate
        # The request's own deferred checks: another request (another thread, task, or an enclosing
        # call) never sees them, nor this one theirs.
        token = _open_scope()
        try:
            return call(self.model, *args, **kwargs)
        finally:
            _close_scope(token)

    @property
    def __signature__(self) -> inspect.Signature:
        # transformers reads the forward's parameters (e.g. to see mm_encoder_outputs is accepted)
        return inspect.signature(original_method(self.model, self.name))

    @property
    def __doc__(self):  # noqa: D105 - the original's documentation
        return original_method(self.model, self.name).__doc__


@torch.compiler.disable
def original_method(model, name: str):
    """The method ``name`` of a patched model as it was before the patch, bound to ``model`` (eager:
    Dynamo would rebuild the class function bound to the instance as the instance's attribute, the
    patched method itself)."""
    saved = model.__dict__[_PATCH_ATTR][2]
    if name in saved:
        return saved[name]
    return getattr(type(model), name).__get__(model, type(model))


@torch.compiler.disable(recursive=False)
def _patched_forward(model, *args, **kwargs):
    original = original_method(model, "forward")
    pruned = _prepare_forward(model, original, args, kwargs)
    if pruned is None:
        return original(*args, **kwargs)
    call, record = pruned
    output = original(**call)
    _finish_forward(output, call, record)
    return output


@torch.compiler.disable
def _prepare_forward(model, original, args, kwargs) -> tuple[dict[str, Any], PromptRecord | None] | None:
    """The call to hand to the original forward and the record its cache gets, or None to pass the
    caller's arguments through (no pixels to prune, no pruned cache to continue). Runs eagerly."""
    config, adapter, _ = model.__dict__[_PATCH_ATTR]
    if not args and kwargs.get(adapter.pixel_key) is None and _recorded(_cache_of(kwargs)) is None:
        return None
    call = _bind(inspect.signature(original), args, kwargs)
    record = _continued_record(adapter, call)
    if record is not None:
        return _continuation(model, adapter, call, record, full_input_ids=False)[0], None
    if not adapter.wants_pruning(call):
        return None
    reason = adapter.unprunable(call)
    if reason is not None:
        warnings.warn(f"medpruner: request not pruned: {reason}", stacklevel=4)
        return None
    pruned = adapter.run(model, config, call)
    return pruned.call, pruned.record


@torch.compiler.disable
def _finish_forward(output, call: dict[str, Any], record: PromptRecord | None) -> None:
    # The request's deferred kernel checks (queued after its last host read) are raised here, after
    # the model's own work, so an error belongs to the request that caused it.
    if record is not None:
        raise_pending_errors()
        _attach_record(_cache_of(output) or _cache_of(call), record)


def _patched_generate(model, inputs=None, *args, **kwargs):
    config, adapter, _ = model.__dict__[_PATCH_ATTR]
    original = original_method(model, "generate")
    if isinstance(inputs, torch.Tensor) and kwargs.get("input_ids") is None:
        kwargs["input_ids"], inputs = inputs, None
    if inputs is not None:
        return original(inputs, *args, **kwargs)
    record = _continued_record(adapter, kwargs)
    if record is not None:
        call, repeats = _continuation(model, adapter, kwargs, record, full_input_ids=True)
        _translate_length_budget(model, call, kwargs["input_ids"].shape[1])
        # off the cache while generate runs: its own forward calls are in pruned coordinates already
        with _record_detached(_cache_of(call)):
            output = original(*args, **call)
        _attach_record(_cache_of(output) or _cache_of(call), record)
        prompt = record.original_input_ids.repeat_interleave(repeats, dim=0)
        return _restore_prompt(output, prompt, record.input_ids.shape[1])
    if not adapter.wants_pruning(kwargs):
        with _record_detached(_cache_of(kwargs)):
            return original(*args, **kwargs)
    reason = adapter.unprunable(kwargs)
    if reason is not None:
        warnings.warn(f"medpruner: request not pruned: {reason}", stacklevel=3)
        return original(*args, **kwargs)
    # generate keeps no autograd graph (transformers runs it under no_grad); the pruning before it
    # must not either: it would hold the tower's activations, and assisted decoding deep-copies the
    # features, which only works on leaves.
    # generate returns no image outputs: the tower is not asked for its hidden states or attentions
    request = {k: v for k, v in kwargs.items() if k not in TOWER_OUTPUT_FLAGS}
    with torch.no_grad():
        pruned = adapter.run(model, config, request)
    call = {**pruned.call, **{k: kwargs[k] for k in TOWER_OUTPUT_FLAGS if k in kwargs}}
    _translate_length_budget(model, call, pruned.original_input_ids.shape[1])
    # the record joins the cache once generate returns: its forward calls are in pruned coordinates
    output = original(*args, **call)
    raise_pending_errors()
    _attach_record(_cache_of(output) or _cache_of(call), pruned.record)
    return _restore_prompt(output, pruned.original_input_ids, pruned.pruned_length)


def unpatch(model) -> None:
    """Undo :meth:`Adapter.patch`: the instance gets back exactly the attributes it had before."""
    state = getattr(model, _PATCH_ATTR, None)
    if state is None:
        return
    for name in (*_PATCHED_NAMES, _PATCH_ATTR, "medpruner_config", "medpruner_stats"):
        model.__dict__.pop(name, None)
    model.__dict__.update(state[2])


def _bind(signature: inspect.Signature, args, kwargs) -> dict[str, Any]:
    bound = signature.bind_partial(*args, **kwargs)
    call = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in call:
            call.update(call.pop(name))
    return call


_CACHE_KEYS = ("cache", "past_key_values")
_RECORD_ATTR = "_medpruner_prompt"


def _cache_of(source):
    """The KV cache in a call's keyword arguments or a model output (transformers 5 names it
    ``cache``; ``past_key_values`` is the older name)."""
    for key in _CACHE_KEYS:
        value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
        if value is not None and hasattr(value, "get_seq_length"):
            return value
    return None


def _attach_record(cache, record: PromptRecord | None) -> None:
    """The cache a pruned request filled remembers that its prompt was pruned (and how), so a call
    that continues from it gets the same pruned prompt, whatever ran in between."""
    if cache is not None and record is not None:
        setattr(cache, _RECORD_ATTR, record)


def _recorded(cache) -> PromptRecord | None:
    return None if cache is None else cache.__dict__.get(_RECORD_ATTR)


@contextmanager
def _record_detached(cache):
    """Take the cache's record off while the block runs (a plain generate continuing an unpruned
    prefix, or the original generate decoding from a pruned one); put it back afterwards."""
    record = None if cache is None else cache.__dict__.pop(_RECORD_ATTR, None)
    try:
        yield
    finally:
        if record is not None and _recorded(cache) is None:
            _attach_record(cache, record)


def _continued_record(adapter, call: dict[str, Any]) -> PromptRecord | None:
    """The record of a non-empty cache a pruned request filled, when ``call`` continues it."""
    cache = _cache_of(call)
    record = _recorded(cache)
    if record is None or call.get("input_ids") is None or call.get(adapter.pixel_key) is not None:
        return None
    return record if cache.get_seq_length() > 0 else None


def _continuation(model, adapter, call: dict[str, Any], record: PromptRecord, *, full_input_ids: bool):
    """``call`` rewritten to continue a cache that holds the pruned prompt: the caller's tensors start
    with the unpruned prompt (input_ids only in generate, which takes the whole sequence), and that
    prefix becomes the pruned one. Returns (call, rows per prompt row)."""
    out = dict(call)
    ids = call["input_ids"]
    prompt = record.original_input_ids.to(ids.device)
    repeats = max(ids.shape[0] // prompt.shape[0], 1)
    prompt_length = prompt.shape[1]
    if full_input_ids:
        # one host read: a mismatched prompt would decode from another request's cache
        same = (
            ids.shape[0] == prompt.shape[0] * repeats
            and ids.shape[1] >= prompt_length
            and torch.equal(ids[:, :prompt_length], prompt.repeat_interleave(repeats, dim=0))
        )
        if not same:
            raise ValueError(
                "input_ids must start with the prompt of the pruned request that filled the cache "
                f"({tuple(prompt.shape)} repeated {repeats}x): the cache holds its pruned prompt"
            )
    pruned = {"input_ids": record.input_ids, "attention_mask": record.attention_mask}
    if record.type_ids is not None:
        pruned[adapter.type_ids_key] = record.type_ids
    for key, head in pruned.items():
        given = call.get(key)
        if key == "input_ids" and not full_input_ids:
            continue
        head = head.to(ids.device).repeat_interleave(repeats, dim=0)
        if given is None:
            if key == "attention_mask" and full_input_ids:
                out[key] = torch.cat([head, head.new_ones(head.shape[0], ids.shape[1] - prompt_length)], dim=1)
            continue
        if not full_input_ids and given.shape[-1] <= ids.shape[1]:
            # forward with only the new tokens: a tensor of their length needs no prompt
            continue
        out[key] = torch.cat([head.to(given.dtype), given[:, prompt_length:]], dim=1)
    adapter.restore_continuation(model, record.position_state, repeats)
    return out, repeats


def _translate_length_budget(model, call: dict[str, Any], caller_length: int) -> None:
    """``max_length`` counts the prompt: keep the caller's budget of new tokens, not more."""
    if call.get("max_new_tokens") is not None:
        return
    generation_config = call.get("generation_config") or model.generation_config
    if getattr(generation_config, "max_new_tokens", None) is not None:
        return
    max_length = call.pop("max_length", None) or getattr(generation_config, "max_length", None)
    if max_length is not None:
        budget = max_length - caller_length
        if budget > 0:
            call["max_new_tokens"] = budget


def _restore_prompt(output, prompt: torch.Tensor, pruned_length: int):
    """generate returns prompt + new tokens: put the caller's unpruned prompt back so that slicing the
    output at ``input_ids.shape[1]`` still yields exactly the new tokens."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    prompt = prompt.to(sequences.device)
    if sequences.shape[0] != prompt.shape[0]:
        prompt = prompt.repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
    restored = torch.cat([prompt, sequences[:, pruned_length:]], dim=1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    return output
