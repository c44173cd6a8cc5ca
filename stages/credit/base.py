"""What every credit-assignment method is built on (stage 4 of survey §8).

Every method is a :class:`CreditMethod` subclass registered with
:func:`stages.credit.registry.register_method`. A
method *declares* what it needs from the other stages (``needs``: e.g. ``{"critic"}``) and the
stages provide it through :class:`CreditContext`; the pipeline never branches on a method's name.
Each method also declares its own config dataclass (``Config``, subclass of
:class:`CreditConfig`): its fields are exactly the keys allowed under ``credit.`` in the run
config when ``credit.method`` names that method.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch

from stages.schema import Batch, BatchTensors, CreditResult, Overhead
from stages.config_fields import check_dataclass, param


@dataclass
class CreditConfig:
    """Base of every method's config; ``method`` selects the registry entry."""

    method: str = param("grpo", help="credit-assignment method (registry name; `creditflow methods` lists them)")


class Critic(Protocol):
    """A learned value function V(s) over response positions (provided by the update stage)."""

    def values(self, tensors: BatchTensors) -> torch.Tensor:
        """(B, R) value of the state *before* each response token (no grad)."""


def critic_values(method: str, critic: Critic, tensors: BatchTensors) -> torch.Tensor:
    """``critic.values(tensors)`` without grad, detached: the (B, R) values every critic-based method
    reads. Anything else the critic returns is one ``ValueError`` naming the method and the shape."""
    with torch.no_grad():
        values = critic.values(tensors)
    shape = tuple(tensors.response_mask.shape)
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != shape:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"credit method '{method}': critic.values() must return a (B, R) = {shape} tensor, got {got}")
    return values.detach()


def check_hidden(method: str, hidden: Any, tensors: BatchTensors) -> torch.Tensor:
    """``ctx.hidden_states`` as a (B, R, H) tensor, else one ``ValueError`` naming the method."""
    B, R = tensors.response_mask.shape
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, R):
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"credit method '{method}': ctx.hidden_states must be a (B, R, H) tensor with (B, R) = {(B, R)}, got {got}")
    return hidden.float()


class MCRollouts(Protocol):
    """Monte Carlo continuations with the current policy from points inside the batch's episodes
    (VinePPO §3.1.1, SPO §3.1.5, Math-Shepherd-style process rewards).

    ``starts`` are ``(row, position)`` pairs: the prefix is trajectory ``row``'s prompt plus its
    first ``position`` response tokens. ``position`` must lie on a policy token span (the start of
    a turn's action, or inside it) or equal a turn's action start; the environment is restored to
    the state that turn's action was taken in and the continuation finishes the episode. Returns
    ``(returns, overhead)``: ``returns`` is (N, k) float, each continuation's return-to-go from the
    prefix's turn on (terminal reward + turn rewards of that turn and later ones).

    ``replacements`` (optional, one per start; ``None`` = no replacement) makes a start an
    *intervention* (InT, Yang et al. 2026, survey §3.3.1): its position must be a turn's action
    start, and the text replaces that turn's action (the environment is restored to the state
    before the turn, the text is applied as the action, the policy continues); the return then
    counts from the replaced turn on. Providers keep ``last_continuations`` (per start, each
    continuation's action texts) for the record."""

    def __call__(self, starts: list[tuple[int, int]], k: int,
                 replacements: Optional[list[Optional[str]]] = None) -> tuple[torch.Tensor, Overhead]: ...


class Scorer(Protocol):
    """Log-probs under the *current* policy of ``targets[i]`` following ``contexts[i]`` (token ids;
    no grad). Used by self-rewarding methods (T-REG's contrastive prompts, implicit rewards)."""

    forward_passes: int

    def __call__(self, contexts: list[list[int]], targets: list[list[int]]) -> list[torch.Tensor]: ...


class ProcessRewards(Protocol):
    """Per-step process rewards of a batch from the configured source (step checks, MC
    estimates from the policy, a PRM trained here): (B, K) float, nan for absent steps."""

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, Overhead]: ...


class Judge(Protocol):
    """An LLM critic/judge backed by a real model (the local policy, a local HF model, or an
    OpenAI-compatible endpoint); see :mod:`stages.reward.judge`. ``calls`` counts model calls."""

    calls: int

    def step_verdicts(self, batch: Batch) -> torch.Tensor:
        """(B, K) 1.0 where the judge says step k of trajectory b is correct, 0.0 incorrect, nan absent."""

    def propose(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Free-text generation (e.g. InT's self-proposed correction of a wrong step)."""

    def prompt_scores(self, prompts: list[str]) -> torch.Tensor:
        """(N,) the judge's yes-probability for free-form yes/no prompts ending in ``"Answer:"``: in
        [0, 1] (a local judge's renormalised yes/no probability, an endpoint's 1.0 / 0.0 verdict), nan
        where unparsed (turn-level judges: TARL, CriticSearch, LaRe)."""


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens (``[]`` for empty text): how methods that build
    prompts or score texts (T-REG's instructions, the oracle's action texts) tokenize them."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


#: every value a method may put in ``needs``, and what the stages then set on the context
NEEDS: dict[str, str] = {
    "critic": "a learned value model V(s) (ctx.critic)",
    "greedy_rollout": "the return of one greedy episode per task instance (ctx.greedy_rollout; ReMax)",
    "mc_rollouts": "Monte Carlo continuations from inside episodes (ctx.mc_rollouts: MCRollouts)",
    "ref_logprobs": "(B, R) response log-probs under the frozen initial policy (ctx.ref_logprobs)",
    "scorer": "log-probs of given tokens after given contexts under the current policy (ctx.scorer)",
    "process_rewards": "per-step process rewards from the configured source (ctx.process_rewards)",
    "judge": "an LLM judge backed by a real model (ctx.judge)",
    "tokenizer": "the policy's tokenizer (ctx.tokenizer), for methods that build prompts or decode tokens",
    "hidden_states": "(B, R, H) last-layer hidden states of the behaviour policy at every response position "
                     "(ctx.hidden_states; position j has read the response up to and including token j; one forward "
                     "over the batch; SPA-RL's progress features)",
    "planning_pattern": "the task family's planning-text regex (ctx.planning_pattern: TaskFamily.planning_pattern, "
                        "\"\" when the family declares none; HICRA's strategic grams)",
    "rollout_temperature": "the behaviour policy's sampling temperature (ctx.rollout_temperature: rollout.temperature), "
                           "for methods that score the batch's tokens with a model of their own (iStar's implicit PRM)",
    "default_action": "the task family's default action text (ctx.default_action: TaskFamily.default_action; the "
                      "counterfactual action of C3/CCPO with credit.counterfactual=default)",
}


@dataclass
class CreditContext:
    """What the stages provide to a credit method, by its declared ``needs`` (:data:`NEEDS`)."""

    critic: Optional[Critic] = None
    #: greedy (argmax) rollout of each trajectory's task instance: batch -> ((B,) greedy return, Overhead)
    greedy_rollout: Optional[Callable[[Batch], tuple[torch.Tensor, Any]]] = None
    mc_rollouts: Optional[MCRollouts] = None
    ref_logprobs: Optional[torch.Tensor] = None
    scorer: Optional[Scorer] = None
    process_rewards: Optional[ProcessRewards] = None
    judge: Optional[Judge] = None
    tokenizer: Any = None
    #: regex of the family's planning text ("" = the family declares none); see environments.planning_text
    planning_pattern: Optional[str] = None
    #: the family's default action text (C3/CCPO's fixed counterfactual action); None where it declares none
    default_action: Optional[str] = None
    #: (B, R, H) float last-layer hidden states of the behaviour policy (see :data:`NEEDS`)
    hidden_states: Optional[torch.Tensor] = None
    #: rollout.temperature (see :data:`NEEDS`)
    rollout_temperature: Optional[float] = None
    generator: Optional[torch.Generator] = None
    extras: dict[str, Any] = field(default_factory=dict)


class CreditMethod(abc.ABC):
    """One credit-assignment method. Subclasses set the class attributes and implement ``assign``."""

    name: ClassVar[str]
    Config: ClassVar[type[CreditConfig]] = CreditConfig
    #: granularity of the method's native credit (schema.GRANULARITIES)
    granularity: ClassVar[str]
    #: methodology family per the survey's taxonomy (§2.4 / Appendix B column "Methodology")
    methodology: ClassVar[str]
    #: True for episode-level baselines (GRPO, PPO, RLOO, ...) — Appendix C "episode-level baseline"
    episode_level_baseline: ClassVar[bool] = False
    #: True when the method's baseline is the group of rollouts of the same task (group-normalised:
    #: GRPO, RLOO, ...): with ``rollout.group_size=1`` every advantage is 0, so the loader refuses it
    needs_group: ClassVar[bool] = False
    #: True when the method reads the task's exact MDP (``Trajectory.ground_truth.mdp``; the
    #: oracle): the loader refuses it on a family that does not export one (``TaskFamily.exact_mdp``)
    needs_exact_mdp: ClassVar[bool] = False
    #: privileged keys (``Trajectory.privileged``) of which the method needs at least one (e.g. IGPO:
    #: ``("answer",)``): the loader refuses a family whose ``TaskFamily.privileged_keys`` has none of them
    needs_privileged: ClassVar[tuple[str, ...]] = ()
    #: True when the method reads a plan turn at turn 0 of every trajectory (PilotRL; the plan-first
    #: variant, :mod:`environments.plan_first`): the loader refuses it unless ``env.plan_first`` is set
    needs_plan_turn: ClassVar[bool] = False
    #: what the method needs the stages to provide: a subset of :data:`NEEDS`
    needs: ClassVar[frozenset[str]] = frozenset()
    #: short citation of the paper / survey section the method implements
    reference: ClassVar[str] = ""
    #: the ``update=`` config group (``configs/update/<name>.yaml``) the loader selects for this
    #: method when the run selects none itself (e.g. Turn-PPO's per-turn ratio loss); "" = base.yaml's
    default_update: ClassVar[str] = ""
    #: False for a reference method whose passes compute privileged ground truth rather than credit a
    #: real method could compute (the oracle): its credit-stage compute is measured and reported apart,
    #: not charged to a budget (stages/benchmark/budget.py: credit_spend)
    charged: ClassVar[bool] = True

    def __init__(self, cfg: CreditConfig):
        self.cfg = cfg
        check_dataclass(cfg, "credit")  # the Config's field rules and config_rules() (stages/config_fields.py)

    def task_weights(self, curriculum: dict[str, float], iteration: int, iterations: int) -> Optional[dict[str, float]]:
        """Relative sampling weights (task_id -> weight > 0; absent ids weigh 1) of the train
        instances for ``iteration`` of ``iterations``, from the ``CreditResult.curriculum`` scores
        the credit stages of the earlier iterations recorded. ``None`` (the default): uniform."""
        return None

    def bind_policy(self, policy: torch.nn.Module) -> None:
        """Hand the method the live policy module before :meth:`build_helpers`, for a helper that
        is a copy of the policy (iStar's implicit PRM, initialised from it); ignored by default.
        The method must not train the policy itself: only its own copies."""

    def build_helpers(self, hidden_size: int, seed: int) -> None:
        """Create the method's trained helper modules (e.g. SPA-RL's progress estimator) for a
        policy of width ``hidden_size``, initialised from ``seed``; none by default. The run
        calls it once, when it builds the policy, before any checkpoint is written or read."""

    def helper_modules(self) -> dict[str, torch.nn.Module]:
        """The method's trained helpers by name: saved in every policy checkpoint and loaded with
        it (so they survive a resume); empty by default."""
        return {}

    def update_helpers(self, credit: CreditResult, seed: int) -> dict[str, float]:
        """Train the helpers on what this iteration's credit stage recorded
        (``CreditResult.helper_inputs``); the update stage calls it before writing the checkpoint.
        Returns statistics logged as ``update.<key>``; nothing by default."""
        return {}

    def checklist_note(self) -> str:
        """What the Appendix C checklist should say beyond the methodology (e.g. privileged
        information the method uses at training time); empty by default."""
        return ""

    @abc.abstractmethod
    def assign(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        """Compute per-token advantages and the native credit (vectorized torch)."""

    def __call__(self, tensors: BatchTensors, batch: Batch, ctx: CreditContext) -> CreditResult:
        missing = [n for n in sorted(self.needs) if getattr(ctx, n, None) is None]
        if missing:
            raise ValueError(f"credit method {self.name!r} needs {missing} but the stages did not provide it")
        t0 = time.perf_counter()
        result = self.assign(tensors, batch, ctx)
        result.overhead.wall_seconds += time.perf_counter() - t0
        return result
