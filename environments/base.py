"""Interfaces of stage 1, environment construction (survey §8, §8.2).

A :class:`TaskFamily` generates task instances (with seeds and train/eval splits) and makes a
live :class:`Environment` for one episode of an instance. Environments speak text: ``reset``
returns the prompt, ``step`` takes the policy's decoded action text and returns the next
observation. Families that execute untrusted code get a :class:`~environments.sandbox.base.Sandbox`
from the environment-construction stage; pure-Python MDPs (bifurcation) declare
``needs_sandbox = False`` and run in the rollout process.

Families register themselves with :func:`environments.registry.register_family`; each declares
a config dataclass (``Config``) whose fields are the keys allowed under ``env.`` in the run config.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from environments.ground_truth import GroundTruthCredit
from stages.config_fields import check_dataclass, param


#: the splits every family provides (disjoint by construction)
SPLITS = ("train", "eval")


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed derived from ``parts`` (sha256 of ``"|".join(parts)``): stable across runs,
    processes and Python versions, unlike ``hash``."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def hash_split(text: str, eval_share: int) -> str:
    """The split a task text belongs to, fixed by its hash (1 in ``eval_share`` goes to eval), so
    train and eval can never share a task."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
    return "eval" if h % eval_share == 0 else "train"


def require_spec(instance: "TaskInstance", keys: tuple[str, ...], family: str) -> None:
    """Raise a clear error when ``instance.spec`` lacks one of ``keys`` (an instance of another family)."""
    for k in keys:
        if k not in instance.spec:
            raise ValueError(f"instance {instance.task_id}: spec lacks {k!r} (not a {family} instance?)")


def as_action_text(action_text: Any) -> str:
    """The policy's decoded action as ``str``: bytes are decoded as UTF-8 (invalid bytes become
    U+FFFD), anything else that is not text (None, numbers) is the empty action ``""``."""
    if isinstance(action_text, bytes):
        return action_text.decode("utf-8", "replace")
    return action_text if isinstance(action_text, str) else ""


@dataclass
class EnvConfig:
    """Base of every task family's config; ``name`` selects the family."""

    name: str = param("bifurcation", help="task family (registry name)")


@dataclass(frozen=True)
class TaskInstance:
    """One task instance; ``spec`` is JSON-serialisable and fully determines the task."""

    task_id: str
    split: str
    seed: int
    spec: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class StepResult:
    observation: str
    reward: float
    done: bool
    #: environment's parse of the action ("A"), or None when the action was invalid
    action: Optional[str]
    #: state key of the *next* state (hashable; GiGPO anchor states)
    state_key: str
    success: bool = False
    #: why the episode ended (only meaningful when done)
    reason: str = ""
    #: family-specific details, copied into ``Turn.info``. ``info["verifiable"]`` (bool) is the family's
    #: declaration that this turn's ``reward`` is an exact check of the action (a verifier's verdict),
    #: read by credit methods with hybrid turn rewards (MT-GRPO, Wei et al. 2025): absent = not verifiable
    info: dict[str, Any] = field(default_factory=dict)


class Environment(abc.ABC):
    """A live episode of one task instance.

    Environments keep two episode flags that :meth:`check_can_step` reads: ``_started`` (set by
    ``reset``) and ``_done`` (set by the step that ends the episode)."""

    _started: bool = False
    _done: bool = False

    def check_can_step(self) -> None:
        """The guard at the start of every ``step``: ``RuntimeError`` before ``reset()`` and after
        the episode ended."""
        if not self._started:
            raise RuntimeError("call reset() before step()")
        if self._done:
            task_id = getattr(getattr(self, "instance", None), "task_id", type(self).__name__)
            raise RuntimeError(f"episode of {task_id} is over; call reset()")

    @abc.abstractmethod
    def reset(self) -> str:
        """Start the episode; return the prompt text (task description + first observation)."""

    @abc.abstractmethod
    def step(self, action_text: str) -> StepResult:
        """Apply the policy's decoded action text."""

    @abc.abstractmethod
    def state_key(self) -> str:
        """Hashable key of the current state."""

    def ground_truth(self, actions: list[Optional[str]]) -> Optional[GroundTruthCredit]:
        """Exact per-turn credit of the episode's taken actions, where the MDP is known."""
        return None

    def snapshot(self) -> Any:
        """An opaque handle from which :meth:`restore` can resume this state."""
        raise NotImplementedError(f"{type(self).__name__} does not support snapshots")

    def restore(self, handle: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support snapshots")

    def stats(self) -> dict[str, float]:
        """Per-episode environment accounting, read by the agent loop when the episode ends and
        stored in ``Trajectory.meta``: e.g. ``sandbox_seconds`` (wall time spent in sandbox
        execs), ``sandbox_execs``, ``env_resets``. Empty for in-process MDPs."""
        return {}

    def privileged(self) -> dict[str, Any]:
        """Training-time-only information about the episode's task (e.g. gold supporting
        documents, reference solution) for critics that may use it (SWEET-RL-style, §4);
        stored in ``Trajectory.privileged``; never shown to the policy."""
        return {}

    def close(self) -> None:
        """Release sandboxes and other resources (idempotent)."""


class TaskFamily(abc.ABC):
    """A family of tasks: instance generation, environment factory, verifier, description."""

    name: ClassVar[str]
    Config: ClassVar[type[EnvConfig]] = EnvConfig
    #: whether environments of this family execute code in a sandbox
    needs_sandbox: ClassVar[bool] = False
    #: whether every episode's ground truth carries the task's exact MDP (``GroundTruthCredit.mdp``),
    #: so that credit under any policy is computable (the oracle-credit method)
    exact_mdp: ClassVar[bool] = False
    #: planning text of the family's actions (HICRA's strategic grams, Wang et al. 2025c §3;
    #: :mod:`environments.planning_text`): a regular expression whose matches in one step's action
    #: text are planning tokens, the rest execution. ``None``: the family's text has no planning
    #: (HICRA would be GRPO there, so the config loader refuses it)
    planning_pattern: ClassVar[Optional[str]] = None
    #: a fixed default ("no-op") action text of the family, the counterfactual action of difference
    #: rewards (C3/CCPO with ``credit.counterfactual=default``, survey §5). ``None``: the family declares
    #: none (the config loader refuses ``counterfactual=default`` there)
    default_action: ClassVar[Optional[str]] = None
    #: keys every environment's ``privileged()`` carries (training-time information: a gold answer, a
    #: gold path); credit methods that read one (IGPO's gold answer, CriticSearch's privileged critic)
    #: declare ``needs_privileged`` and the config loader refuses a family without any of them
    privileged_keys: ClassVar[tuple[str, ...]] = ()
    #: whether an agent program outside creditflow plays the family's episodes against the served
    #: policy (Agent Lightning's decoupled execution, Luo et al. 2025; env=lightning): the rollout
    #: stage plays its slots with :class:`stages.rollout.lightning.AgentProgramPlayer` instead of the
    #: agent loop, and its episodes can be neither replayed nor forked
    external_agent: ClassVar[bool] = False

    def __init__(self, cfg: Optional[EnvConfig] = None):
        self.cfg = cfg if cfg is not None else self.Config()
        check_dataclass(self.cfg, "env")  # the Config's field rules and config_rules() (stages/config_fields.py)

    def instance(self, split: str, index: int, seed: int) -> TaskInstance:
        """Instance ``index`` of ``split`` for ``seed`` (deterministic)."""
        raise NotImplementedError(f"task family {self.name!r} does not implement instance()")

    def instances(self, split: str, n: int, seed: int) -> list[TaskInstance]:
        """``n`` deterministic instances of ``split`` ("train" or "eval") for ``seed``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if n < 0:
            raise ValueError(f"instances: n must be >= 0, got {n}")
        # instance() is deterministic and TaskInstance frozen: a pool is built once per family
        # object, not again every iteration by the environment stage
        cache = self.__dict__.setdefault("_instance_pools", {})
        pool = cache.setdefault((split, seed), [])
        pool.extend(self.instance(split, i, seed) for i in range(len(pool), n))
        return pool[:n]

    @classmethod
    def sandbox_problem(cls, env_cfg: Any, sandbox_cfg: Any) -> Optional[tuple[str, str]]:
        """``(key, rule)`` when this family's sandboxed mode cannot run with the run's ``sandbox.``
        settings (a backend it cannot run in, too little memory); checked by the config loader
        before any compute. Default: none."""
        return None

    @abc.abstractmethod
    def make(self, instance: TaskInstance, sandbox: Any = None, episode_seed: int = 0) -> Environment:
        """A fresh environment for one episode of ``instance``.

        ``episode_seed`` seeds the environment's own randomness (stochastic transitions), so
        the episodes of a group (same instance, distinct seeds) differ reproducibly."""

    @abc.abstractmethod
    def describe(self) -> dict[str, str]:
        """Reporting fields (Appendix C): data source, size, filtering, metric definition."""

    def profile(self) -> Optional[dict[str, Any]]:
        """The task profile the decision tree (survey §7.5, Table 8) ranks methods for
        (:class:`stages.credit.decision_tree.TaskProfile` fields), or None if undeclared."""
        return None

    def verify(self, trajectory: Any) -> Optional[tuple[float, bool, dict[str, Any]]]:
        """Post-hoc verifier of a finished episode: (terminal reward, success, info).

        ``None`` (the default) means the environment's own terminal reward and success, recorded
        during the rollout, are final. Families whose verdict needs extra work after the episode
        (hidden unit tests, answer checking) override this; the reward stage calls it."""
        return None

    def warmup_corpus(self, n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
        """Episodes for the supervised format warm-up: (prompt, [(action_text, observation), ...])
        with valid actions chosen uniformly at random (teaches format, not the answer)."""
        raise NotImplementedError(f"task family {self.name!r} has no warm-up corpus")
