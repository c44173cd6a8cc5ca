"""Built-in credit-assignment methods; importing this package registers them all.

One module per method family (survey Appendix B "Methodology" column):

* :mod:`.episode` — episode-level baselines: GRPO, RLOO, REINFORCE++ (+ group baseline) and
  PPO's GAE with a learned critic (survey §2.3, §2.5).
* :mod:`.montecarlo` — VinePPO (§3.1.1) and SPO (§3.2): Monte Carlo values from continuations.
* :mod:`.prefix_tree` — TEMPO: TD over the prefix tree of a group (§3.2).
* :mod:`.shapley` — SCAR: Shapley values over steps (§3.2).
* :mod:`.redistribution` — RED: holistic reward redistributed over steps (§3.1.2).
* :mod:`.critic_llm` — CAPO (§3.3.3) and InT (§3.3.1): an LLM critic judges steps.
* :mod:`.planning` — HICRA: amplified credit on planning tokens (§3.3.4).
* :mod:`.attribution` — ACPO: attribution-based factorized credit (§3.3.2).
* :mod:`.process` — PURE, SPRO, PRL: process rewards and their aggregation (§3.3.1).
* :mod:`.implicit` — implicit token credit from DPO (From r to Q*, §3.1.3) and T-REG (§3.1.2).
* :mod:`.turn_level` — ITPO (implicit turn rewards) and Turn-PPO (critic over turn states, GAE
  over turns): the turn-level MDP of multi-turn agents (§5.1).
* :mod:`.agentic_group` — GiGPO (step groups over anchor states, §5.3) and CARL (critical
  high-entropy actions, §5.4).
* :mod:`.action_decomposition` — POAD: token-level critic backed up with BAD inside and across turns (§5.3).
* :mod:`.progress` — SPA-RL: a trained progress estimator splits the episode reward over turns (§5.7).
* :mod:`.counterfactual` — C3 and CCPO: a turn's credit from real replays of the episode with a
  counterfactual action at that turn (leave-one-out / average treatment effect, §5).
* :mod:`.agentic_critic` — ArCHer (§5.4): a turn-level Q/V critic trained off-policy by TD from a
  persisted replay buffer, the token-level actor on its turn advantage; AgentPRM (§5.1): a
  step-level promise/progress model trained on TD + GAE labels.
* :mod:`.belief` — IGPO (information gain of the gold answer, §5.5) and HCAPO (hindsight ratio of
  each action with and without the outcome, §5.2): turn credit from the policy's own teacher-forced beliefs.
* :mod:`.judged_turns` — CriticSearch (a retrospective critic with the gold answer, §5.2), TARL (an LLM
  judge adjudicates each turn, §5.1), LaRe (LLM-written step explanations become step rewards, §5.7) and
  MT-GRPO (hybrid turn rewards: exact on the family's verifiable turns, an LLM judge's elsewhere, §5.1).
* :mod:`.privileged` — SWEET-RL: a critic on privileged training-time information, trained with
  Bradley–Terry on trajectory pairs, whose turn advantages feed a DPO actor update (§5.1).
* :mod:`.implicit_step` — iStar: implicit step rewards from a trajectory-DPO-trained implicit PRM
  (a copy of the policy), fused with episode-level advantages (§5.6).
* :mod:`.expert_irl` — StepAgent: step rewards inferred by inverse RL from expert actions (the task's
  optimal agent or the run's successes) with a step-wise DPO-trained implicit reward model, and the
  novice-to-expert curriculum (§5.6).
* :mod:`.montecarlo` (also) — credit-uncertainty-driven branching (``uncertainty_branching``, creditflow's
  own, §8.1/§9.2): VinePPO's continuation budget re-allocated to the boundaries whose values are most uncertain.
* :mod:`.lightning` — LightningRL (Agent Lightning, §5.7): an outside agent program's LLM calls are
  transitions; each episode's group-normalised reward goes to every call and token of it.
* :mod:`.oracle` — exact advantages from the task's MDP under the current policy (§9.3; the
  benchmark's upper bound, not a reviewed paper).
* :mod:`.shaping` — PRS + VSPO (a format-then-outcome reward schedule over training and value-based
  task sampling, §5.7) and the adaptive segment-level reward (balanced pivot segments, §5.7).
* :mod:`.planning` (also) — PilotRL (§5.4): progressive plan-level, then step-level, then token-level
  credit for agents that write a global plan first (the plan-first variant, ``env.plan_first=true``).
* :mod:`.skills` — SCRIBE (§5.7): a persisted library of skill prototypes (seeded k-means of successful
  steps' hidden-state features); a step's credit is its fit to the nearest prototype times that prototype's value.

How to add a method
-------------------

1. **Module.** Put it in the module of its family here, or in a new module
   ``stages/credit/methods/<family>.py`` imported below. Its docstring reads the method top to
   bottom: the paper and survey section, the formula, then the edge cases. Shared math comes from
   plain functions: :mod:`stages.credit.functional` (verl's episode estimators),
   :mod:`stages.credit.group_stats`, :mod:`stages.credit.masked_stats`,
   :mod:`stages.credit.segments` (steps, segments, unit values -> tokens) and
   :mod:`stages.credit.ref_logratio`; never from another method's module. Vectorized torch, no
   Python loop over tokens or batch rows.
2. **Config.** A dataclass subclassing :class:`~stages.credit.base.CreditConfig` whose fields are
   all ``param(default, help=..., ge=/gt=/choices=/finite=...)`` (:mod:`stages.config_fields`):
   ``method`` defaults to the registry name, every help cites the paper, every rule sits at its
   field (cross-field rules in ``config_rules()``). These fields are exactly the keys allowed
   under ``credit.`` when ``credit.method`` names the method (``credit=<name>`` works from the
   registry alone; a ``configs/credit/<name>.yaml`` is only for non-default settings).
3. **Registration.** A :class:`~stages.credit.base.CreditMethod` subclass decorated with
   :func:`stages.credit.registry.register_method`, setting ``name``, ``Config``, ``granularity``,
   ``methodology``, ``reference`` and, where they apply, ``needs`` (a subset of
   :data:`~stages.credit.base.NEEDS`: what the stages must provide on the
   :class:`~stages.credit.base.CreditContext`; the pipeline never branches on the name),
   ``needs_group``, ``episode_level_baseline``. ``assign(tensors, batch, ctx)`` returns a
   :class:`~stages.schema.CreditResult` with per-token advantages, the native credit and the
   method's :class:`~stages.schema.Overhead`.
4. **Inventory row.** Set ``status: "implemented"`` and ``registry_name`` on the method's row of
   ``stages/credit/data/inventory.json`` (Appendix B), with ``simplified`` where it departs from
   the paper on purpose; a registry method that is not a reviewed paper goes under
   ``registry_extras``. ``tests/test_inventory.py`` checks the registry against the inventory.
5. **Tests.** ``tests/test_credit_<name>.py`` with a test of the method's *defining property*,
   taken from the paper's description (e.g. PURE's credit is the min over future process
   rewards, SCAR's step credits are Shapley values), and a differential test against an
   independent reference computation on the same inputs (``tests/reference_estimators.py`` for
   the episode-level baselines), plus the config rules' one-line errors.
"""

from stages.credit.methods import episode  # noqa: F401
from stages.credit.methods import montecarlo  # noqa: F401  (vineppo, spo)
from stages.credit.methods import prefix_tree  # noqa: F401  (tempo)
from stages.credit.methods import redistribution  # noqa: F401  (red)
from stages.credit.methods import shapley  # noqa: F401  (scar)
from stages.credit.methods import critic_llm  # noqa: F401  (capo, int)
from stages.credit.methods import planning  # noqa: F401  (hicra)
from stages.credit.methods import attribution  # noqa: F401  (acpo)
from stages.credit.methods import process  # noqa: F401  (pure, spro, prl)
from stages.credit.methods import implicit  # noqa: F401  (dpo_implicit, t_reg)
from stages.credit.methods import oracle  # noqa: F401  (oracle)
from stages.credit.methods import turn_level  # noqa: F401  (itpo, turn_ppo)
from stages.credit.methods import agentic_group  # noqa: F401  (gigpo, carl)
from stages.credit.methods import progress  # noqa: F401  (spa)
from stages.credit.methods import action_decomposition  # noqa: F401  (poad)
from stages.credit.methods import counterfactual  # noqa: F401  (c3, ccpo)
from stages.credit.methods import agentic_critic  # noqa: F401  (archer, agentprm)
from stages.credit.methods import belief  # noqa: F401  (igpo, hcapo)
from stages.credit.methods import judged_turns  # noqa: F401  (criticsearch, tarl, lare, mt_grpo)
from stages.credit.methods import privileged  # noqa: F401  (sweet_rl)
from stages.credit.methods import implicit_step  # noqa: F401  (istar)
from stages.credit.methods import expert_irl  # noqa: F401  (stepagent)
from stages.credit.methods import shaping  # noqa: F401  (prs, adaptseg)
from stages.credit.methods import lightning  # noqa: F401  (lightning)
from stages.credit.methods import skills  # noqa: F401  (scribe)
