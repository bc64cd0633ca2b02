"""vLLM features users combine with the plugin: each works, or the engine refuses to start.

The check runs where vLLM builds its config (``VllmConfig.__post_init__``, through the per-architecture
hook :func:`config_hook` that ``register()`` installs), in the process that constructs the engine and
before any worker starts, so a refusal is one ``ValueError`` raised by ``LLM(...)`` / ``vllm serve``.

* EVS (``video_pruning_rate > 0``): refused. vLLM then calls the model's ``recompute_mrope_positions``
  on every multimodal item, which strips the 4 or 5 position channels EVS appends, while the plugin's
  embeddings carry 3 (see ``_compat`` on ``SupportsMultiModalPruning``); the plugin serves no video,
  the only thing EVS prunes.
* Speculative decoding: proposers that read token ids only (``ngram``, ``ngram_gpu``, ``suffix``) work,
  the target verifies as usual (tested with ``ngram``: the greedy tokens equal those without it).
  Proposers that run a drafter network (EAGLE/EAGLE3, MTP, draft models, Medusa, ...) are refused: the
  drafter is fed the target's multimodal embeddings, which carry the plugin's 3 position channels, and
  vLLM's EAGLE set-up looks up the image token by the upstream class names.
* ``cudagraph_mode``: no mode is refused; the position offsets reach the language model through a
  persistent buffer a captured graph reads (``models.py``, "CUDA graphs"), tested by replaying a traced
  forward on CPU; no GPU has run it yet.
* Chunked prefill (a chunk may end inside a slice's placeholders) and prefix caching work: the offsets
  ride with each token's embedding, and the per-slice counts are kept with the CPU metadata a
  prefix-cache hit keeps.
"""

from __future__ import annotations

TOKEN_PROPOSERS = ("ngram", "ngram_gpu", "suffix")


def unsupported(vllm_config) -> list[str]:
    """Why ``vllm_config`` cannot serve the plugin's models (empty when it can)."""
    problems = []
    multimodal = getattr(vllm_config.model_config, "multimodal_config", None)
    rate = getattr(multimodal, "video_pruning_rate", None) if multimodal is not None else None
    if rate is not None and rate > 0:
        problems.append(
            f"EVS (video_pruning_rate={rate}) makes vLLM recompute M-RoPE positions from the channels EVS "
            "appends to media embeddings, which are not the plugin's; MedPruner serves image slices and no "
            "video, so set video_pruning_rate=0"
        )
    speculative = vllm_config.speculative_config
    if speculative is not None and speculative.method not in TOKEN_PROPOSERS:
        problems.append(
            f"speculative decoding with method {speculative.method!r} runs a drafter network on the target's "
            "multimodal embeddings, which carry the plugin's position channels; use a proposer that reads "
            f"token ids only ({', '.join(TOKEN_PROPOSERS)}) or no speculative decoding"
        )
    return problems


def check_serving_config(vllm_config) -> None:
    """ValueError naming every unsupported feature of ``vllm_config``."""
    problems = unsupported(vllm_config)
    if problems:
        architecture = vllm_config.model_config.architecture
        raise ValueError(f"medpruner ({architecture}) cannot serve with: " + "; ".join(problems))


_hook = None


def config_hook():
    """vLLM's per-architecture config hook class running :func:`check_serving_config`."""
    global _hook
    if _hook is None:
        from medpruner.vllm._compat import VerifyAndUpdateConfig

        class MedPrunerServingCheck(VerifyAndUpdateConfig):
            @staticmethod
            def verify_and_update_config(vllm_config) -> None:
                check_serving_config(vllm_config)

        _hook = MedPrunerServingCheck
    return _hook
