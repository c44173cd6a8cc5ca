"""The *plan-first* variant of a task family (``env.plan_first=true``): turn 0 asks the agent for a
global plan of the whole episode before it acts (PilotRL's AdaPlan paradigm, Lu et al. 2025,
"PilotRL: Training Language Model Agents via Global Planning-Guided Progressive Reinforcement
Learning", arXiv 2508.00344; survey §5.4).

:class:`PlanFirstEnv` wraps any :class:`~environments.base.Environment` of a family that can
describe the episode ahead (a :class:`PlanSpec`, built by the family):

* ``reset()`` returns the spec's plan prompt (the task header and what the plan may rely on,
  e.g. bifurcation's cues ahead); the wrapped environment is reset but not shown yet.
* The first ``step(text)`` is the **plan turn**: ``text`` is recorded as the episode's plan,
  the wrapped environment does **not** step (no state change, reward 0, not done), and the
  observation is the wrapped episode's first observation. The plan stays in the context of every
  later turn (the agent loop's context is the whole transcript).
* Every later step is the wrapped environment's step ``k - 1`` unchanged (the *execution* turns).

Plan parse and quality (documented, deterministic). The spec's action alphabet is single
characters (bifurcation's letters); **the plan is the sequence of the plan text's characters that
are valid actions, in order; character k is the planned action of execution turn k** (spaces,
commas and anything else are ignored; characters beyond the execution horizon are ignored, a
plan shorter than the horizon plans nothing for the remaining turns). Against the spec's
ground-truth optimal path (``optimal[k]``: the action the task requires at execution turn k, or
``None`` where any valid action is optimal):

    plan_score     = mean over required turns k of 1[plan[k] == optimal[k]]   (1.0 when none is required)
    plan_adherence = mean over played execution turns k of 1[action_k == plan[k]]  (0.0 before any)

both in [0, 1], recorded in :meth:`PlanFirstEnv.stats` (``Trajectory.meta``: ``plan_score``,
``plan_adherence``, ``plan_length``) and in the plan turn's ``info`` (``plan``: True,
``plan_score``, ``planned``). The plan turn's ``StepResult.action`` is the parsed plan as a
string (``"BAAB"``), ``None`` when the text names no valid action.

Ground truth. The plan does not change the environment, so under the family's reference policy
(which does not read the plan) the plan turn's exact advantage is 0: :func:`prepend_plan_turn`
gives it ``value = q_value = V(s_0)``, ``advantage = 0``, not decisive, and the exported MDP a
no-op turn 0 (every action keeps the state, reward 0); the execution turns' ground truth is the
wrapped environment's, unchanged (turn k + 1 of the trajectory is turn k of the wrapped episode).

Snapshots hold the phase, the plan and the wrapped snapshot; restore passes ``reseed`` through.
Sandboxed families work unchanged: the wrapper never touches the sandbox, the wrapped environment
runs its transitions there as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from environments.base import Environment, StepResult
from environments.ground_truth import GroundTruthCredit, TabularMDP


@dataclass(frozen=True)
class PlanSpec:
    """What a family tells the plan-first wrapper about one episode (see the module docstring)."""

    #: the plan turn's prompt (the episode's prompt in the plan-first variant)
    prompt: str
    #: the wrapped episode's first observation, shown after the plan
    first_observation: str
    #: the valid single-character actions the plan may name
    actions: str
    #: per execution turn: the action the optimal path requires there, None where any valid action is optimal
    optimal: tuple[Optional[str], ...]


def parse_plan(text: Any, actions: str, horizon: int) -> list[str]:
    """The planned actions of ``text``: its characters that are in ``actions``, in order, at most
    ``horizon`` of them (module docstring, "Plan parse")."""
    if not isinstance(text, str):
        return []
    valid = set(actions)
    return [c for c in text if c in valid][: max(int(horizon), 0)]


def plan_score(plan: list[str], optimal: tuple[Optional[str], ...]) -> float:
    """Share of the turns the optimal path constrains that ``plan`` gets right (1.0 if none)."""
    need = [(k, a) for k, a in enumerate(optimal) if a is not None]
    if not need:
        return 1.0
    return sum(k < len(plan) and plan[k] == a for k, a in need) / len(need)


def plan_adherence(plan: list[str], actions: list[Optional[str]]) -> float:
    """Share of the played execution turns whose parsed action is the plan's (0.0 before any)."""
    if not actions:
        return 0.0
    return sum(k < len(plan) and a == plan[k] for k, a in enumerate(actions)) / len(actions)


def _noop_turn(mdp: TabularMDP) -> TabularMDP:
    """``mdp`` with a turn 0 prepended at which every action keeps the state and earns 0."""
    S, A = mdp.num_states, len(mdp.actions)
    reward = [[[0.0] * A for _ in range(S)]] + list(mdp.reward)
    transition = list(mdp.transition)
    if transition:
        transition = [[[[1.0 if s2 == s else 0.0 for s2 in range(S)] for _ in range(A)] for s in range(S)]] + transition
    next_state = None if mdp.next_state is None else [[[s] * A for s in range(S)]] + list(mdp.next_state)
    states = list(mdp.states[:1]) + list(mdp.states)
    return replace(mdp, reward=reward, transition=transition, next_state=next_state, states=states)


def prepend_plan_turn(gt: Optional[GroundTruthCredit]) -> Optional[GroundTruthCredit]:
    """The ground truth of a plan-first episode from its execution turns' ``gt``: the plan turn
    first, with advantage 0 and the value of the first state (module docstring, "Ground truth").
    An episode cut before its first execution turn has no state value to give the plan turn:
    ``gt`` is returned as it is (empty)."""
    if gt is None or not gt.value:
        return gt
    v0 = gt.value[0]
    return replace(
        gt,
        value=[v0] + list(gt.value),
        q_value=[v0] + list(gt.q_value),
        advantage=[0.0] + list(gt.advantage),
        decisive=[False] + list(gt.decisive),
        mdp=None if gt.mdp is None else _noop_turn(gt.mdp),
        mistake=None if gt.mistake is None else [False] + list(gt.mistake),
        value_se=None if gt.value_se is None else [gt.value_se[0]] + list(gt.value_se),
    )


class PlanFirstEnv(Environment):
    """A plan turn before the wrapped episode (module docstring). ``spec_of(env)`` builds the
    :class:`PlanSpec` from the freshly reset wrapped environment."""

    def __init__(self, inner: Environment, spec_of: Any):
        self.inner = inner
        self.instance = getattr(inner, "instance", None)
        self._spec_of = spec_of
        self.spec: Optional[PlanSpec] = None
        self.plan_text: Optional[str] = None
        self.plan: list[str] = []
        #: the parsed actions of the execution turns played so far
        self.exec_actions: list[Optional[str]] = []
        self._started = False
        self._done = False

    @property
    def planned(self) -> bool:
        """Whether the plan turn has been played."""
        return self.plan_text is not None

    def reset(self) -> str:
        self.inner.reset()
        self.spec = self._spec_of(self.inner)
        self.plan_text, self.plan, self.exec_actions = None, [], []
        self._started, self._done = True, False
        return self.spec.prompt

    def step(self, action_text: str) -> StepResult:
        self.check_can_step()
        if self.planned:
            res = self.inner.step(action_text)
            self.exec_actions.append(res.action)
            self._done = bool(res.done)
            return res
        assert self.spec is not None
        text = action_text if isinstance(action_text, str) else ""
        self.plan_text = text
        self.plan = parse_plan(text, self.spec.actions, len(self.spec.optimal))
        prefix = "" if text.endswith("\n") else "\n"
        score = plan_score(self.plan, self.spec.optimal)
        return StepResult(
            observation=prefix + self.spec.first_observation, reward=0.0, done=False,
            action="".join(self.plan) or None, state_key=self.inner.state_key(),
            info={"plan": True, "plan_score": score, "planned": "".join(self.plan), "turn_reward": 0.0,
                  "verifiable": False},
        )

    def state_key(self) -> str:
        return self.inner.state_key() + ("" if self.planned else "|plan")

    def ground_truth(self, actions: list[Optional[str]]) -> Optional[GroundTruthCredit]:
        """The wrapped ground truth of the execution turns (``actions[1:]``) behind the plan turn's."""
        if not actions:
            return self.inner.ground_truth([])
        return prepend_plan_turn(self.inner.ground_truth(list(actions[1:])))

    def stats(self) -> dict[str, float]:
        out = dict(self.inner.stats())
        if self.spec is not None:
            out["plan_score"] = plan_score(self.plan, self.spec.optimal) if self.planned else 0.0
            out["plan_adherence"] = plan_adherence(self.plan, self.exec_actions)
            out["plan_length"] = float(len(self.plan))
        return out

    def privileged(self) -> dict[str, Any]:
        return self.inner.privileged()

    def snapshot(self) -> dict[str, Any]:
        return {"plan_text": self.plan_text, "exec_actions": list(self.exec_actions), "done": self._done,
                "started": self._started, "inner": self.inner.snapshot()}

    def restore(self, handle: dict[str, Any], **kwargs: Any) -> None:
        self.inner.restore(handle["inner"], **kwargs)
        self.plan_text = handle["plan_text"]
        self.exec_actions = list(handle["exec_actions"])
        self._done, self._started = handle["done"], handle["started"]
        if self.spec is None:
            self.spec = self._spec_of(self.inner)
        self.plan = [] if self.plan_text is None else parse_plan(self.plan_text, self.spec.actions, len(self.spec.optimal))

    def close(self) -> None:
        self.inner.close()
