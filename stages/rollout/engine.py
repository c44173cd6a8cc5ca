"""Rollout engine interface (survey §8, stage 2).

An engine samples continuations of a batch of token contexts with the current policy and
returns, per context, the sampled tokens with their behaviour log-probs and the entropy of
the sampling distribution at each position. The multi-turn agent loop
(:mod:`stages.rollout.agent_loop`) drives engines turn by turn; engines never see environments.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional


@dataclass
class GenerationRequest:
    context_ids: list[int]
    #: per-request seed (reproducibility independent of batch composition)
    seed: int
    #: leading tokens of ``context_ids`` that other requests of the same call may share (a group's
    #: prompt, a forked prefix of Monte Carlo continuations): a hint, never a promise. Engines may
    #: prefill each distinct shared prefix once (HFEngine) or find it in their prefix cache (vLLM);
    #: the samples do not depend on it
    shared_prefix: int = 0


@dataclass
class GenerationOutput:
    token_ids: list[int]
    #: log pi(token | context) under the sampling distribution (temperature applied)
    logprobs: list[float]
    #: entropy of the sampling distribution at each generated position
    entropies: list[float]
    #: "stop" (a stop token was sampled; it is included in token_ids) or "length"
    finish_reason: str


class RolloutEngine(abc.ABC):
    name: str

    def generate(
        self,
        requests: list[GenerationRequest],
        max_new_tokens: int,
        stop_token_ids: set[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[GenerationOutput]:
        """Sample one continuation per request, batched: ``[]`` for no requests; otherwise the
        arguments are checked (:func:`check_generation_args`) and the engine's :meth:`_generate`
        samples. ``stats["forward_tokens"]`` counts the tokens the call's forward passes cover: each
        request's context plus its generated tokens (shared-prefix / KV-cache reuse not discounted,
        the convention of the rollout batch's prompt + response tokens in the compute budget)."""
        if not requests:
            return []
        check_generation_args(requests, max_new_tokens, temperature, top_p)
        outputs = self._generate(requests, max_new_tokens, stop_token_ids, temperature, top_p)
        stats = getattr(self, "stats", None)
        if isinstance(stats, dict):  # every request's context + its generated tokens (forward_tokens)
            stats["forward_tokens"] = stats.get("forward_tokens", 0) + sum(len(r.context_ids) for r in requests) \
                + sum(len(o.token_ids) for o in outputs)
        return outputs

    @abc.abstractmethod
    def _generate(self, requests: list[GenerationRequest], max_new_tokens: int, stop_token_ids: set[int],
                  temperature: float, top_p: float) -> list[GenerationOutput]:
        """The engine's sampling of a non-empty batch of checked requests (see :meth:`generate`)."""


def check_generation_args(requests: list[GenerationRequest], max_new_tokens: int, temperature: float,
                          top_p: float) -> None:
    """``ValueError`` naming the bad argument of a :meth:`RolloutEngine.generate` call: at least one
    new token, ``top_p`` in (0, 1], ``temperature >= 0`` (0 = greedy), no empty context."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    for i, r in enumerate(requests):
        if not r.context_ids:
            raise ValueError(f"request {i} has an empty context")

    def sync_weights(self, model: Optional[object] = None) -> float:
        """Make the engine sample from the latest policy weights; return seconds spent."""
        return 0.0
