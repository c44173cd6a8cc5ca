"""Data that flows between the five stages of the training loop (survey §8).

A :class:`Trajectory` holds one episode of multi-turn agent/environment interaction
(survey §2.2, "agentic RL as a turn-level POMDP"); a :class:`Batch` is a list of
trajectories grouped by task instance (group ids for group baselines such as GRPO, §2.3).
:class:`BatchTensors` is the padded, response-aligned tensor view every credit method and
the policy update consume; :class:`CreditResult` and :class:`Overhead` are what credit
assignment returns (DESIGN.md, "Data that flows").

Layout conventions (the same as verl's, so estimators port without surprises):

* ``response_ids`` of a trajectory are *everything after the prompt*: the policy's tokens of
  every turn and the environment's observation tokens between turns, in order.
* ``policy_mask[j]`` is True where ``response_ids[j]`` was sampled by the policy.
* In :class:`BatchTensors` prompts are left-padded to a common length P and responses are
  right-padded to a common length R, so column ``j`` of every (B, R) tensor is response token j.

Validation happens here, at the edge: malformed data raises ``ValueError`` naming the field,
the index and the value, never deep inside torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import torch

from environments.ground_truth import GroundTruthCredit

#: Granularities of credit, the first axis of the survey's taxonomy (§2.4).
GRANULARITIES = ("episode", "token", "segment", "step", "turn", "multi-agent")


@dataclass
class Turn:
    """One agent turn: the policy's action tokens, then the environment's reply.

    Spans are half-open ``[start, end)`` indices into the trajectory's ``response_ids``.
    """

    index: int
    action_span: tuple[int, int]
    obs_span: tuple[int, int]
    action_text: str
    observation: str
    reward: float = 0.0
    #: hashable key of the environment state the action was taken in (GiGPO anchor state)
    state_key: str = ""
    #: the environment's parse of the action (e.g. "A"); None if the action was invalid
    action: Optional[str] = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trajectory:
    """One episode (prompt + multi-turn response) with everything credit methods may need."""

    uid: str
    group_id: int
    task_id: str
    env_name: str
    prompt_ids: list[int]
    response_ids: list[int]
    policy_mask: list[bool]
    #: behaviour policy log-prob of each response token (0.0 on observation tokens)
    logprobs: list[float]
    #: entropy of the behaviour policy's next-token distribution (0.0 on observation tokens)
    entropies: list[float]
    turns: list[Turn]
    #: terminal (episodic) reward R(tau)
    reward: float = 0.0
    success: bool = False
    #: why the episode ended: success, failure, invalid_action, max_turns, length, or a sandbox fault
    done_reason: str = ""
    prompt_text: str = ""
    ground_truth: Optional[GroundTruthCredit] = None
    #: spans of reasoning steps inside turns (step-level methods); half-open into response_ids
    step_spans: list[tuple[int, int]] = field(default_factory=list)
    #: agent id per turn (multi-agent settings); empty means single agent
    agent_ids: list[int] = field(default_factory=list)
    #: handles of environment snapshots per turn (to re-run from a turn: VinePPO, counterfactuals)
    snapshots: list[Any] = field(default_factory=list)
    #: privileged information available only at training time (e.g. SWEET-RL)
    privileged: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_policy_tokens(self) -> int:
        return int(sum(self.policy_mask))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and index of the first malformed value."""
        n = len(self.response_ids)
        for name in ("policy_mask", "logprobs", "entropies"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"trajectory {self.uid}: {name} has length {len(getattr(self, name))}, "
                    f"response_ids has {n} (env '{self.env_name}')"
                )
        if not isinstance(self.reward, (int, float)) or not math.isfinite(self.reward):
            raise ValueError(
                f"trajectory {self.uid}: reward must be a finite number, got {self.reward!r} "
                f"(env '{self.env_name}')"
            )
        for t, turn in enumerate(self.turns):
            if not math.isfinite(turn.reward):
                raise ValueError(
                    f"trajectory {self.uid}: turn_rewards[{t}] must be a finite number, got "
                    f"{turn.reward!r} (env '{self.env_name}')"
                )
            for span_name in ("action_span", "obs_span"):
                a, b = getattr(turn, span_name)
                if not (0 <= a <= b <= n):
                    raise ValueError(
                        f"trajectory {self.uid}: turns[{t}].{span_name}={a, b} outside response "
                        f"of length {n} (env '{self.env_name}')"
                    )
        for j, lp in enumerate(self.logprobs):
            if not math.isfinite(lp):
                raise ValueError(
                    f"trajectory {self.uid}: logprobs[{j}] must be finite, got {lp!r} "
                    f"(env '{self.env_name}')"
                )


@dataclass
class Batch:
    """A list of trajectories grouped by task instance (``group_id``)."""

    trajectories: list[Trajectory]
    iteration: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.trajectories)

    def token_count(self) -> int:
        """Tokens (prompt + response) of all trajectories: what one forward pass over the batch reads."""
        return sum(len(t.prompt_ids) + len(t.response_ids) for t in self.trajectories)

    def validate(self) -> None:
        for traj in self.trajectories:
            traj.validate()

    def to_tensors(self, pad_token_id: int = 0) -> "BatchTensors":
        """The padded tensor view; built once per batch object and pad id (credit and update share it)."""
        cache = self.__dict__.setdefault("_tensor_cache", {})
        if pad_token_id not in cache:
            cache[pad_token_id] = BatchTensors.from_batch(self, pad_token_id=pad_token_id)
        return cache[pad_token_id]

    def invalidate_tensors(self) -> None:
        """Call after mutating trajectories in place (e.g. rewards) so the view is rebuilt."""
        self.__dict__.pop("_tensor_cache", None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_tensor_cache", None)  # derived data never goes into persisted results
        return state


@dataclass
class BatchTensors:
    """Padded tensor view of a :class:`Batch` (prompt left-padded, response right-padded).

    Shapes: B trajectories, P = longest prompt, R = longest response, K = most turns.
    """

    input_ids: torch.Tensor  # (B, P+R) long
    attention_mask: torch.Tensor  # (B, P+R) long
    position_ids: torch.Tensor  # (B, P+R) long
    prompt_len: int  # P
    response_ids: torch.Tensor  # (B, R) long
    response_mask: torch.Tensor  # (B, R) float: 1.0 on policy tokens
    old_logprobs: torch.Tensor  # (B, R) float: behaviour log-probs
    entropies: torch.Tensor  # (B, R) float
    token_level_rewards: torch.Tensor  # (B, R) float: turn rewards at each turn's last action token, terminal reward at the last policy token
    episode_rewards: torch.Tensor  # (B,) float
    index: torch.Tensor  # (B,) long group id
    turn_ids: torch.Tensor  # (B, R) long: turn index of each policy token, -1 elsewhere
    num_turns: torch.Tensor  # (B,) long
    gt_turn_advantage: Optional[torch.Tensor] = None  # (B, K) float, nan where absent
    decisive: Optional[torch.Tensor] = None  # (B, K) bool
    #: (B, K) bool: a repairable mistake (``GroundTruthCredit.mistake``) in a successful episode,
    #: i.e. a repaired one; None unless the task marks mistakes
    gt_repaired_mistake: Optional[torch.Tensor] = None
    #: (B, K) long: ids of the state each turn was taken in (``Turn.state_key``; the turn index where a
    #: turn has no key), -1 beyond a row's turns: the anchor states of turn pairs (update.loss=turn_dpo)
    turn_anchors: Optional[torch.Tensor] = None

    @property
    def max_turns(self) -> int:
        return int(self.num_turns.max().item()) if self.num_turns.numel() else 0

    @classmethod
    def from_batch(cls, batch: Batch, pad_token_id: int = 0) -> "BatchTensors":
        trajs = batch.trajectories
        if not trajs:
            raise ValueError("cannot build tensors from an empty batch")
        B = len(trajs)
        P = max(len(t.prompt_ids) for t in trajs)
        R = max(max(len(t.response_ids) for t in trajs), 1)
        K = max(max(len(t.turns) for t in trajs), 1)
        input_ids = torch.full((B, P + R), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, P + R), dtype=torch.long)
        response_mask = torch.zeros((B, R))
        old_logprobs = torch.zeros((B, R))
        entropies = torch.zeros((B, R))
        rewards = torch.zeros((B, R))
        turn_ids = torch.full((B, R), -1, dtype=torch.long)
        gt = torch.full((B, K), float("nan"))
        decisive = torch.zeros((B, K), dtype=torch.bool)
        repaired = torch.zeros((B, K), dtype=torch.bool)
        has_gt = has_mistakes = False
        for i, t in enumerate(trajs):
            lp, lr = len(t.prompt_ids), len(t.response_ids)
            input_ids[i, P - lp : P] = torch.as_tensor(t.prompt_ids, dtype=torch.long)
            input_ids[i, P : P + lr] = torch.as_tensor(t.response_ids, dtype=torch.long)
            attention_mask[i, P - lp : P + lr] = 1
            response_mask[i, :lr] = torch.as_tensor(t.policy_mask, dtype=torch.float32)
            old_logprobs[i, :lr] = torch.as_tensor(t.logprobs, dtype=torch.float32)
            entropies[i, :lr] = torch.as_tensor(t.entropies, dtype=torch.float32)
            for k, turn in enumerate(t.turns):
                a, b = turn.action_span
                turn_ids[i, a:b] = k
                if b > a:
                    rewards[i, b - 1] += turn.reward
            if t.ground_truth is not None:
                has_gt = True
                n = len(t.ground_truth.advantage)
                gt[i, :n] = torch.as_tensor(t.ground_truth.advantage, dtype=torch.float32)
                decisive[i, :n] = torch.as_tensor(t.ground_truth.decisive, dtype=torch.bool)
                if t.ground_truth.mistake is not None:
                    has_mistakes = True
                    repaired[i, :n] = torch.as_tensor(t.ground_truth.mistake, dtype=torch.bool) & bool(t.success)
        turn_ids = torch.where(response_mask.bool(), turn_ids, torch.full_like(turn_ids, -1))
        episode_rewards = torch.tensor([float(t.reward) for t in trajs])
        # terminal reward sits on the last policy token of each row (vectorized)
        has_policy = response_mask.sum(-1) > 0
        last = (R - 1) - response_mask.flip(-1).argmax(-1)
        rewards[torch.arange(B)[has_policy], last[has_policy]] += episode_rewards[has_policy]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            prompt_len=P,
            response_ids=input_ids[:, P:],
            response_mask=response_mask,
            old_logprobs=old_logprobs,
            entropies=entropies,
            token_level_rewards=rewards,
            episode_rewards=episode_rewards,
            index=torch.tensor([int(t.group_id) for t in trajs], dtype=torch.long),
            turn_ids=turn_ids,
            num_turns=torch.tensor([len(t.turns) for t in trajs], dtype=torch.long),
            gt_turn_advantage=gt if has_gt else None,
            decisive=decisive if has_gt else None,
            gt_repaired_mistake=repaired if has_mistakes else None,
            turn_anchors=turn_key_ids(batch, K, key=lambda turn: turn.state_key or ("#turn", turn.index)),
        )


@dataclass
class Overhead:
    """Compute a credit method (or stage) spends beyond plain rollout + update (Appendix C,
    "CA-specific overhead: additional forward passes, environment resets, or LLM calls")."""

    extra_forward_passes: int = 0
    #: tokens through those extra forward passes, counted per sequence (no padding): every scored
    #: or prefilled sequence's own tokens, plus each generated token (a batched call over rows of
    #: different lengths counts each row's length; what :mod:`stages.benchmark.budget` charges)
    forward_tokens: int = 0
    extra_tokens: int = 0
    env_resets: int = 0
    env_steps: int = 0
    #: environments brought to a forked state by ``restore`` from a snapshot (MC continuations)
    env_restores: int = 0
    #: the part of ``env_steps`` spent replaying recorded turns to reach a forked state
    env_replay_steps: int = 0
    judge_calls: int = 0
    wall_seconds: float = 0.0

    def __add__(self, other: "Overhead") -> "Overhead":
        return Overhead(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class CreditResult:
    """What credit assignment hands to the policy update (DESIGN.md, "Data that flows")."""

    #: (B, R) per-token advantages, zero outside ``response_mask``; all the update consumes
    advantages: torch.Tensor
    #: granularity of ``credit`` (one of :data:`GRANULARITIES`)
    granularity: str
    #: credit at the method's own granularity: (B,) for episode, (B, R) for token, (B, K) for turn
    credit: torch.Tensor
    overhead: Overhead = field(default_factory=Overhead)
    #: (B, R) returns (value targets) where the method has them
    returns: Optional[torch.Tensor] = None
    #: (B, R) value estimates where the method used a critic
    values: Optional[torch.Tensor] = None
    #: free-form per-method statistics logged as metrics (``credit.<key>``)
    stats: dict[str, float] = field(default_factory=dict)
    #: JSON-serialisable per-method records (e.g. InT's interventions: prompt, proposal, outcomes),
    #: logged by the flow as the MLflow artifact ``credit/<key>/iter_<iteration>.json``
    records: dict[str, Any] = field(default_factory=dict)
    #: per task instance score (task_id -> float) that the method's sampling schedule reads
    #: (:meth:`stages.credit.base.CreditMethod.task_weights`, e.g. ACPO's credit concentration); the
    #: flow hands it, with the earlier iterations' scores, to the next iteration's environment stage
    curriculum: dict[str, float] = field(default_factory=dict)
    #: tensors the method's trained helpers learn from in the update stage
    #: (:meth:`stages.credit.base.CreditMethod.update_helpers`; SPA-RL: turn features and outcomes);
    #: persisted with the credit result, so a resumed update trains on exactly the same inputs
    helper_inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")


def turn_credit(advantages: torch.Tensor, turn_ids: torch.Tensor, num_turns: int) -> torch.Tensor:
    """Mean advantage over each turn's policy tokens: (B, R) -> (B, K), nan for absent turns.

    Vectorized with ``scatter_add`` (no loop over rows or tokens).
    """
    B = advantages.shape[0]
    K = max(int(num_turns), 1)
    valid = turn_ids >= 0
    idx = turn_ids.clamp(min=0)
    sums = torch.zeros((B, K), dtype=advantages.dtype).scatter_add_(1, idx, advantages * valid)
    counts = torch.zeros((B, K), dtype=advantages.dtype).scatter_add_(1, idx, valid.to(advantages.dtype))
    out = sums / counts.clamp(min=1)
    return torch.where(counts > 0, out, torch.full_like(out, float("nan")))


def turn_key_ids(batch: Batch, num_turns: int, key: Callable[[Turn], Any] = lambda turn: turn.state_key,
                 absent: Optional[Callable[[Turn], bool]] = None) -> torch.Tensor:
    """(B, K) long: dense ids (0.., in order of first appearance over the batch) of ``key(turn)``
    for each row's first ``num_turns`` turns; -1 beyond a row's turns and where ``absent(turn)``.

    The one place string keys of turns become integer ids (the anchor states of GiGPO, Feng et
    al. 2025 §3.2, and the state/action ids of the benchmark's per-turn table): one dictionary
    pass over the turns (data preparation, O(turns)); everything after it is tensor work.
    """
    K = max(int(num_turns), 1)
    ids: dict[Any, int] = {}
    rows = [[-1 if absent is not None and absent(turn) else ids.setdefault(key(turn), len(ids))
             for turn in traj.turns[:K]] for traj in batch.trajectories]
    out = torch.full((len(rows), K), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out
