"""Controlled bifurcation tasks with exact ground-truth credit (survey §4.6, §9.3).

A multi-turn text episode of ``horizon`` turns. At every turn the environment shows a cue (a
lowercase letter) and the policy answers with one uppercase letter. A few turns are
*decisive* (bifurcation points): there, the hidden rule's action for the cue keeps the episode
on track (with probability ``1 - slip_prob``) and any other answer puts it off track for good.
The remaining turns are *routine*: any valid letter is fine. The terminal reward is 1.0 iff
the episode is still on track at the end. Because the MDP is known, every turn's exact value,
Q-value and advantage under a reference policy are computed by dynamic programming
(:func:`exact_values`, :meth:`BifurcationEnv.ground_truth`): the instrument against which
every credit method is measured.

Semantics
---------
* A *rule* (a random permutation without fixed points drawn from ``rule_seed``, see
  :func:`make_rule`) maps cue ``a, b, c, ...`` to action ``A, B, C, ...``; it is shared by all
  instances, so it is learnable across episodes.
* An instance fixes which turns are decisive and the cue of every turn (``instance.spec``:
  ``horizon``, ``num_actions``, ``decisive``, ``cues``, ``answers``; JSON-serialisable).
  With ``distractors=True`` routine turns show a random cue as well, so decisive turns look
  like routine ones (unless ``mark_decisive``); with ``distractors=False`` routine turns show
  cue ``-``. The optimal policy answers the rule's action on every turn.
* State = (turn t, on-track bit). At a decisive turn: the rule's action keeps the bit with
  probability ``1 - slip_prob`` (a *slip* clears it: stochastic transition); a wrong letter
  clears it. At a routine turn a valid letter keeps the bit. **An invalid action (anything
  whose ``strip()`` is not exactly one valid letter) clears the bit on any turn: format errors
  fail the episode.** Once off track the episode can never succeed.
* ``terminate_on_error``: a wrong decisive letter or an invalid action ends the episode at once
  (terminal reward 0; variable trajectory length). Slips do not end the episode.
* Rewards: the *turn* reward ``r_t`` is ``decisive_reward`` for the rule's action at a decisive
  turn (whether or not it slips, on or off track), else 0. The *terminal* reward is 1.0 on
  success, else 0.0. ``StepResult.reward`` is ``r_t``, plus the terminal reward on the final
  step, whose ``info["terminal_reward"]`` gives the terminal part on its own (the agent loop
  splits it off into ``Trajectory.reward``; ``info["turn_reward"]`` is ``r_t`` on every step).
  The return is ``sum_t r_t + terminal``; ground-truth values are expectations of it.
  ``info["verifiable"]`` is true on decisive turns: there the hidden rule checks the action and
  ``r_t`` is that check's exact verdict; a routine turn has nothing to check (any valid letter is
  fine), so it is not verifiable (hybrid turn rewards, :class:`stages.credit.methods.judged_turns.MTGRPO`).
* Randomness: slips only. Each episode draws its slip table (one uniform per turn) from
  ``random.Random`` seeded by (instance seed, ``episode_seed``), so the same instance and
  episode seed replay exactly, whatever the actions. :meth:`BifurcationEnv.restore` replays
  the same future slips unless given ``reseed`` (MC rollouts from a snapshot want fresh ones).

Variants (``env.variant``; issue 15, "task structures with known credit")
-----------------------------------------------------------------------
One transition function (:meth:`environments.tasks.bifurcation_dp.Dynamics.step`) defines every
variant; the episode, the exact DP and the exported :class:`TabularMDP` all derive from it.

* ``decisive`` (default): the task above. States ``OFF``, ``ON`` (and ``END`` after an early end).
* ``recovery``: **an early mistake that a later action can repair.** Instances place a routine
  turn after every decisive one (decisive turns are never adjacent nor last; hence
  ``num_decisive <= horizon // 2``). A wrong valid letter at a decisive turn t taken *on track*
  does not put the episode off track for good: it moves to state ``REPAIR``, and turn t+1 is a
  *repair turn*: the rule's action for turn t+1's cue (``spec["repair"][t+1]``; hence
  ``distractors=true``) restores ``ON``; any other letter or an invalid action puts the episode
  ``OFF`` for good (and ends it with ``terminate_on_error``). A wrong decisive letter off track
  is not repairable. The observation does not show the state (as in ``decisive``); the optimal
  policy (the rule's action on every turn) never needs a repair. Under the uniform reference
  with n letters and ``decisive_reward = 0``, the mistake's exact advantage is
  ``(1/n - (1 - slip_prob)) V(t+1, ON) / n``, negative (for ``slip_prob < 1 - 1/n``) even on an
  episode whose repair succeeded, where an
  outcome-grouped estimator (GRPO) credits every turn of it positively:
  ``GroundTruthCredit.mistake`` marks these turns and the credit stage logs
  ``credit.gt_repaired_mistake_credit`` (mean credit on mistakes of successful episodes). The
  ground truth's ``decisive`` flags include the repair turns actually played. (Were a decisive
  turn its own predecessor's repair turn, the "mistake" would skip a slip for free and have a
  positive advantage: the layout rule excludes that.)
* ``varh``: **variable horizon, a stop/continue decision at every turn.** Action ``S`` (stop) is
  valid on every turn besides the letters and ends the episode; the instance has a *stop turn*
  g (``spec["stop_turn"]``, drawn in [num_decisive, H-1]; every decisive turn comes before it),
  whose observation shows cue ``*``. Stopping succeeds (terminal reward 1) iff the episode is on
  track and t = g; stopping earlier fails at once, and continuing (a letter) at or after g puts
  the episode off track for good, so one that never stops fails at H. Every turn continued
  costs ``continue_cost`` (turn reward ``-continue_cost``). Episodes of one group have different
  lengths, and V(turn, state) depends on the turn (per-timestep baselines matter); the uniform
  reference policy is uniform over the letters and ``S``. The ground truth's ``decisive`` flags
  include the stop turn.
* **Stochastic transitions** are ``slip_prob`` in every variant: the rule's action at a decisive
  turn fails with probability ``slip_prob`` (the episode goes off track), drawn from the
  episode's slip table. It is the only random transition; the DP takes its expectation exactly
  (tested against exhaustive Monte Carlo of the environment itself in every variant).
* The sandboxed mode implements ``decisive`` only (a config rule refuses the other variants).

Plan first (``env.plan_first=true``; PilotRL, Lu et al. 2025, survey §5.4)
-------------------------------------------------------------------------
Any variant, in-process or sandboxed, can be played by a *planning* agent: the episode is wrapped
in :class:`environments.plan_first.PlanFirstEnv` (see there for the parse, ``plan_score`` and the
ground truth). The prompt is the header followed by ``"plan for cues a b b a:"`` (every turn's cue,
in order: ``-`` on routine turns without distractors, ``*`` at varh's stop turn); the policy
answers with its plan on one line, e.g. ``" BAAB\n"`` (one letter per turn; spaces ignored),
and the first turn's observation ``"t1 cue a"`` follows. The optimal path the plan is scored
against is the rule's answer at every decisive turn (routine turns: any valid letter), with
varh's ``S`` at the stop turn (and nothing after it). The plan turn does not step the task; the
execution turns and their ground truth are exactly those of the plain episode.

Text protocol
-------------
The rollout and warm-up code rely on this; the transcript of an episode is exactly the
concatenation ``prompt + action_0 + obs_1 + action_1 + obs_2 + ... + action_{T-1} + obs_T``
with nothing inserted.

* Prompt: ``"Follow the rule. Answer with one letter: A B.\\n"`` (the valid letters, space
  separated) followed by the first turn's observation.
  With ``variant=varh`` it reads ``"... one letter: A B, or S to stop.\\n"``.
* Turn observation: ``"t{k} cue {c}"`` with k = 1..H (1-based) and c the cue (``-`` on
  routine turns without distractors); with ``mark_decisive`` decisive turns read
  ``"t{k} ! cue {c}"``. Every observation where the policy must act **ends with the cue**
  (no trailing space), right where the policy answers. The cue is the last token of the
  context, so even a tiny policy reads it straight from the residual stream; with the cue
  earlier in the line a 2-layer model has to learn to attend to the *latest* of many cues
  first, and GRPO on the default task did not leave chance level in 25 iterations.
* **The policy emits a space, the letter and a newline: ``" A\\n"``**. The newline ends the
  turn: ``"\\n"`` is the stop text (a rollout engine stops at the first token whose text
  contains ``"\\n"``, and that token is part of the action). Warm-up episodes use exactly
  ``" A\\n"``.
* Parsing is lenient about whitespace: ``action_text.strip()`` must equal a valid letter
  (``"A"``, ``" A"``, ``"A\\n"`` are all action A); anything else is invalid
  (``StepResult.action`` is None).
* Observation after a step: the next turn's observation, or ``"done: success"`` /
  ``"done: failure"`` at the end. It does **not** start with ``"\\n"`` when the action text
  ended with ``"\\n"`` (the normal case); when the action text did not end with a newline
  (e.g. cut by the token limit) the observation is prefixed with ``"\\n"``, so every
  observation starts on a fresh line either way.

Example (H=3, decisive turn 2, rule a->B, b->A)::

    Follow the rule. Answer with one letter: A B.
    t1 cue a A
    t2 cue b A
    t3 cue a B
    done: success

Sandboxed mode
--------------
``env.sandboxed=true`` makes the family declare ``needs_sandbox`` (an instance attribute that
shadows the class default, so ``family.needs_sandbox`` is what the rollout stage reads) and
:meth:`BifurcationFamily.make` return a :class:`SandboxedBifurcationEnv`: each transition runs
a stdlib-only step script (``bifurcation_step.py``) inside the episode's sandbox, the state in
its work directory. Trajectories are identical to the in-process mode for the same seeds and
actions (tested); a sandbox fault ends the episode with reason ``sandbox_<reason>``. The
warm-up corpus is generated in-process (same texts).

State keys (GiGPO anchors): ``"{task_id}|t={t}|cue={c}|on={0|1}"`` for the state in which turn
``t`` (0-based) is taken, ``"{task_id}|end|t={t}|on={0|1}"`` for terminal states. They expose
the hidden on-track bit (the *true* MDP state): two episodes of an instance share a key iff
they are in the same true state (``on=r``: the ``REPAIR`` state of ``variant=recovery``).
"""

from __future__ import annotations

import random
from typing import Any, Optional

from environments.base import SPLITS, Environment, TaskFamily, TaskInstance, derive_seed
from environments.plan_first import PlanFirstEnv, PlanSpec
from environments.registry import register_family
from environments.tasks.bifurcation_config import (
    CUES,
    NO_CUE,
    STOP_ACTION,
    STOP_CUE,
    BifurcationConfig,
    format_action,
    make_rule,
)
from environments.tasks.bifurcation_dp import exact_tables, exact_values
from environments.tasks.bifurcation_env import BifurcationEnv
from environments.tasks.bifurcation_sandboxed import SandboxedBifurcationEnv



def plan_spec(env: BifurcationEnv) -> PlanSpec:
    """The plan turn of a bifurcation episode (module docstring, "Plan first"): the prompt shows
    every turn's cue; the optimal path is the rule's answer on decisive turns (``S`` at varh's
    stop turn, where the episode ends)."""
    optimal: list[Optional[str]] = list(env.answers)
    stop = env.instance.spec.get("stop_turn")
    if stop is not None:
        optimal = optimal[:stop] + [STOP_ACTION]
    return PlanSpec(prompt=env.prompt_header + f"plan for cues {' '.join(env.cues)}:",
                    first_observation=env.observation(0), actions=env.letters, optimal=tuple(optimal))


@register_family
class BifurcationFamily(TaskFamily):
    name = "bifurcation"
    Config = BifurcationConfig
    needs_sandbox = False

    exact_mdp = True  # every ground truth carries the instance's TabularMDP (oracle credit)
    #: the fixed default action of difference rewards (C3/CCPO counterfactual=default): letter A (always
    #: valid; not a no-op: bifurcation has none, an invalid action fails the episode)
    default_action = format_action("A")

    def __init__(self, cfg: Optional[Any] = None):
        super().__init__(cfg)
        #: per instance: the sandboxed mode runs its transitions in a sandbox (shadows the class default)
        self.needs_sandbox = bool(getattr(self.cfg, "sandboxed", False))
        #: the hidden rule (privileged: for scripted agents and tests)
        self.rule = make_rule(self.cfg.rule_seed, self.cfg.num_actions)
        self._tables_cache: dict[str, Any] = {}

    def pool_size(self, split: str) -> int:
        """Configured instance count of ``split`` (``train_size`` / ``eval_size``)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return int(self.cfg.train_size if split == "train" else self.cfg.eval_size)

    def instance(self, split: str, index: int, seed: int) -> TaskInstance:
        """Instance ``index`` of ``split`` for ``seed`` (train/eval use disjoint seed streams)."""
        cfg = self.cfg
        iseed = derive_seed("bifurcation-instance", split, seed, index)
        rng = random.Random(iseed)
        H = int(cfg.horizon)
        stop_turn = rng.randrange(int(cfg.num_decisive), H) if cfg.variant == "varh" else None
        if cfg.variant == "recovery":  # a routine turn after every decisive one (its repair turn)
            nd = int(cfg.num_decisive)
            decisive = [x + i for i, x in enumerate(sorted(rng.sample(range(H - nd), nd)))]
        else:
            decisive = sorted(rng.sample(range(H if stop_turn is None else stop_turn), int(cfg.num_decisive)))
        cues: list[str] = []
        for t in range(H):
            c = CUES[rng.randrange(cfg.num_actions)]  # drawn on every turn: same stream either way
            cues.append(c if (t in decisive or cfg.distractors) else NO_CUE)
        answers = [self.rule[cues[t]] if t in decisive else None for t in range(H)]
        spec = {
            "horizon": H,
            "num_actions": int(cfg.num_actions),
            "decisive": decisive,
            "cues": cues,
            "answers": answers,
            "rule_seed": int(cfg.rule_seed),
        }
        if cfg.variant == "recovery":  # the action that repairs a mistake of the previous turn
            spec["repair"] = [self.rule[c] for c in cues]
        if stop_turn is not None:
            cues[stop_turn] = STOP_CUE
            spec["stop_turn"] = stop_turn
        return TaskInstance(task_id=f"bif-{split}-s{seed}-{index}", split=split, seed=iseed, spec=spec)

    def _tables(self, instance: TaskInstance) -> Any:
        key = f"{instance.task_id}|{instance.seed}"
        tables = self._tables_cache.get(key)
        if tables is None:
            if len(self._tables_cache) > 4096:
                self._tables_cache.clear()
            tables = self._tables_cache[key] = exact_tables(instance.spec, self.cfg)
        return tables

    def make(self, instance: TaskInstance, sandbox: Any = None, episode_seed: int = 0) -> Environment:
        """A :class:`BifurcationEnv`; with ``env.sandboxed`` a :class:`SandboxedBifurcationEnv`,
        which needs ``sandbox`` (ValueError without one); with ``env.plan_first`` either wrapped in
        a :class:`~environments.plan_first.PlanFirstEnv` (module docstring, "Plan first")."""
        env = self._make(instance, sandbox, episode_seed)
        return PlanFirstEnv(env, plan_spec) if self.cfg.plan_first else env

    def _make(self, instance: TaskInstance, sandbox: Any = None, episode_seed: int = 0) -> BifurcationEnv:
        spec = instance.spec
        for k in ("horizon", "num_actions", "decisive", "cues", "answers"):
            if k not in spec:
                raise ValueError(f"instance {instance.task_id}: spec lacks {k!r} (not a bifurcation instance?)")
        if self.needs_sandbox:
            return SandboxedBifurcationEnv(self.cfg, instance, sandbox, episode_seed=episode_seed,
                                           tables=self._tables(instance))
        return BifurcationEnv(self.cfg, instance, episode_seed=episode_seed, tables=self._tables(instance))

    def exact_values(self, instance: TaskInstance) -> tuple[list[list[float]], list[list[dict[Optional[str], float]]]]:
        return exact_values(instance.spec, self.cfg)

    def describe(self) -> dict[str, str]:
        c = self.cfg
        structure = (
            f"H={c.horizon}, {c.num_decisive} decisive turns, {c.num_actions} actions, slip_prob={c.slip_prob}, "
            f"distractors={c.distractors}, mark_decisive={c.mark_decisive}, "
            f"terminate_on_error={c.terminate_on_error}, decisive_reward={c.decisive_reward}, variant={c.variant}"
            + (f", continue_cost={c.continue_cost}" if c.variant == "varh" else "")
        )
        metric = (
            "success rate = fraction of episodes ending on track (every decisive turn answered with the "
            "rule's action and not slipped, no invalid action on any turn); terminal reward 1.0 on success "
            "else 0.0"
        )
        if c.variant == "recovery":
            metric += "; a wrong decisive action on track is repaired by the rule's action on the next turn"
        if c.variant == "varh":
            metric += "; the episode must stop (S) at the turn cued '*', stopping elsewhere or never fails"
        if c.decisive_reward:
            metric += f"; plus a turn reward of {c.decisive_reward} per correct decisive action"
        if c.continue_cost:
            metric += f"; minus {c.continue_cost} per turn continued"
        return {
            "source": f"procedurally generated bifurcation MDPs, rule_seed={c.rule_seed} ({structure})",
            "size": f"train: {c.train_size} instances; eval: {c.eval_size} instances",
            "filtering": "none",
            "metric": metric,
            "benchmark": (
                f"bifurcation ({structure}); splits: train, eval (disjoint seed streams; instance "
                "layouts may repeat when the layout space is small)"
            ),
            "ground_truth": f"exact V/Q/advantage by dynamic programming under the {c.reference_policy} reference policy",
            "text_protocol": "policy emits '<LETTER>\\n' right after the observation's ':'; a turn ends at the first '\\n'",
            "execution": ("every transition computed by a stdlib step script inside the episode's sandbox"
                          if c.sandboxed else "in-process"),
            **({"plan_first": "turn 0 is a global plan (one letter per turn, cues ahead shown) that does not step the "
                              "task; plan_score = share of decisive turns the plan answers with the rule's action"}
               if c.plan_first else {}),
        }

    def profile(self) -> dict[str, Any]:
        """Decision-tree profile: an agentic multi-turn task, verifiable outcome only, cheap resets
        (snapshots), stochastic when ``slip_prob > 0``."""
        return {
            "setting": "agentic",
            "turns": self.cfg.horizon,
            "trajectory_tokens": 8 * self.cfg.horizon + 16,
            "verifiable_intermediate": False,
            "verifiable_outcome": True,
            "stochastic": self.cfg.slip_prob > 0,
            "partially_observable": False,
            "privileged_info": True,  # the hidden rule's answers (BifurcationEnv.privileged())
            "num_agents": 1,
            "compute_budget": "low",
            "env_reset_cheap": True,
            "prm_available": False,
        }

    def warmup_corpus(self, n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
        """``n`` episodes with uniformly random valid actions, each written as ``" A\\n"``.

        Instances come from a separate "warmup" seed stream (not the train or eval pools)."""
        out: list[tuple[str, list[tuple[str, str]]]] = []
        for i in range(n):
            inst = self.instance("warmup", i, seed)
            rng = random.Random(derive_seed("warmup-actions", seed, i))
            # in-process even in the sandboxed mode: the texts are identical by construction
            env = BifurcationEnv(self.cfg, inst, episode_seed=rng.getrandbits(31), tables=self._tables(inst))
            prompt = env.reset()
            turns: list[tuple[str, str]] = []
            if self.cfg.plan_first:  # a plan turn of random letters, one per turn (format, not the answer)
                spec = plan_spec(env)
                prompt = spec.prompt
                turns.append((" " + "".join(rng.choice(env.letters) for _ in spec.optimal) + "\n",
                              spec.first_observation))
            while True:
                text = format_action(rng.choice(env.letters))
                res = env.step(text)
                turns.append((text, res.observation))
                if res.done:
                    break
            out.append((prompt, turns))
        return out
