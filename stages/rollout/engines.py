"""Which rollout engine ``rollout.engine`` names (survey §8, stage 2): :func:`make_engine`.

The engines implement :class:`stages.rollout.engine.RolloutEngine`: ``hf``
(:mod:`stages.rollout.hf_engine`, transformers on the live policy) and ``vllm``
(:mod:`stages.rollout.vllm_engine`, the optional extra). Kept apart from the interface so that
the engines import the interface and nothing imports back.
"""

from __future__ import annotations

from typing import Any

from stages.rollout.engine import RolloutEngine

#: engines ``rollout.engine`` may name
ENGINES = ("hf", "vllm")


def make_engine(rollout_cfg: Any, model: Any, tokenizer: Any = None, seed: int = 0) -> RolloutEngine:
    """The rollout engine ``rollout_cfg.engine`` names, sampling from ``model``.

    ``hf``: :class:`stages.rollout.hf_engine.HFEngine` on the live model object (no sync needed).
    ``vllm``: :class:`stages.rollout.vllm_engine.VLLMEngine` in this process, or
    :class:`stages.rollout.vllm_server.VLLMServerEngine` when ``rollout_cfg.vllm_url`` is set
    (optional extra; ``ImportError`` saying how to install it when missing)."""
    name = getattr(rollout_cfg, "engine", "hf")
    if name == "hf":
        from stages.rollout.hf_engine import HFEngine

        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        return HFEngine(model, pad_token_id=pad, max_batch_rows=int(getattr(rollout_cfg, "hf_max_batch_rows", 256)))
    if name == "vllm":
        from stages.rollout.vllm_server import make_vllm_engine

        return make_vllm_engine(model, rollout_cfg, seed=seed)
    raise ValueError(f"config key 'rollout.engine': unknown engine {name!r}; implemented engines: {', '.join(ENGINES)}")
