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

    @abc.abstractmethod
    def generate(
        self,
        requests: list[GenerationRequest],
        max_new_tokens: int,
        stop_token_ids: set[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[GenerationOutput]:
        """Sample one continuation per request, batched."""

    def sync_weights(self, model: Optional[object] = None) -> float:
        """Make the engine sample from the latest policy weights; return seconds spent."""
        return 0.0
