"""Configuration, hidden rule and action text of the bifurcation family (see
:mod:`environments.tasks.bifurcation` for the task and its text protocol)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from environments.base import EnvConfig, derive_seed
from stages.config_fields import param

LETTERS = "ABCDEF"
CUES = "abcdef"
MAX_ACTIONS = len(LETTERS)
REFERENCE_POLICIES = ("uniform", "optimal")
#: the text the policy emits for action ``L`` (warm-up corpus, scripted agents)
ACTION_FORMAT = " {}\n"
#: the text that ends a policy turn
STOP_TEXT = "\n"
NO_CUE = "-"
#: task structures with known credit (issue 15, "Oracle and ground truth"); see
#: :mod:`environments.tasks.bifurcation`, "Variants"
VARIANTS = ("decisive", "recovery", "varh")
#: the stop action of ``variant=varh`` (ends the episode) and the cue of the turn to stop at
STOP_ACTION = "S"
STOP_CUE = "*"


@dataclass
class BifurcationConfig(EnvConfig):
    """Keys allowed under ``env.`` for the bifurcation family."""

    name: str = param("bifurcation", help="task family (registry name)")
    horizon: int = param(4, help="turns per episode (H)", ge=1)
    num_decisive: int = param(2, help="decisive turns (bifurcation points) per instance, 0..horizon", ge=0)
    num_actions: int = param(2, help="valid actions A, B, ... (2..6); cues a, b, ... likewise", ge=2, le=MAX_ACTIONS)
    slip_prob: float = param(0.0, help="probability that a correct decisive action still fails (stochastic transition)", ge=0, le=1)
    distractors: bool = param(True, help="routine turns show a cue too, so decisive turns are not marked")
    mark_decisive: bool = param(False, help="print a \"!\" marker on decisive turns")
    terminate_on_error: bool = param(False, help="a wrong decisive or invalid action ends the episode at once")
    decisive_reward: float = param(0.0, help="turn reward for a correct decisive action (besides terminal 1.0 on success)")
    train_size: int = param(512, help="train-split instance pool size", ge=0)
    eval_size: int = param(128, help="eval-split instance pool size", ge=0)
    rule_seed: int = param(0, help="seed of the hidden cue->action rule shared by all instances")
    reference_policy: str = param("uniform", help="policy of the ground-truth V/Q/A: uniform (over valid actions) | optimal", choices=REFERENCE_POLICIES)
    sandboxed: bool = param(False, help="compute every transition inside a sandbox (stdlib step script; same trajectories)")
    variant: str = param("decisive", help="task structure: decisive (decisive turns among routine ones) | recovery "
                         "(a wrong decisive action can be repaired on the next turn) | varh (variable horizon: "
                         "stop at the turn cued '*'); survey §9.3", choices=VARIANTS)
    continue_cost: float = param(0.0, help="variant=varh: turn reward -continue_cost for every turn the policy "
                                 "continues (answers a letter instead of S)", ge=0)
    plan_first: bool = param(False, help="turn 0 asks for a global plan of the episode (the cues ahead are shown; "
                             "the plan names one letter per turn) before the first cue; the plan turn does not step "
                             "the task (PilotRL's plan-first agents, Lu et al. 2025; environments/plan_first.py)")

    def config_rules(self):
        """Rules between fields (checked by stages.config_fields.check)."""
        if self.num_decisive > self.horizon:
            yield "num_decisive", f"must be <= env.horizon={self.horizon}"
        if self.variant == "varh" and self.num_decisive >= self.horizon:
            yield "num_decisive", f"must be < env.horizon={self.horizon} with env.variant=varh (the stop turn comes after the decisive turns)"
        if self.variant == "recovery" and 2 * self.num_decisive > self.horizon:
            yield "num_decisive", (f"must be <= env.horizon // 2 = {self.horizon // 2} with env.variant=recovery "
                                   "(a routine repair turn follows every decisive turn)")
        if self.variant == "recovery" and not self.distractors:
            yield "distractors", "must be true with env.variant=recovery (a repair turn is answered by its cue)"
        if self.continue_cost and self.variant != "varh":
            yield "continue_cost", "needs env.variant=varh (only the variable-horizon variant has a continue decision)"
        if self.sandboxed and self.variant != "decisive":
            yield "sandboxed", f"not supported with env.variant={self.variant} (the sandbox step script implements variant=decisive)"



def make_rule(rule_seed: int, num_actions: int) -> dict[str, str]:
    """The hidden rule: cue letter -> action letter, a random *derangement* (no cue maps to its
    own capital, so the rule cannot be guessed by copying the cue). With 2 actions the only
    derangement is a->B, b->A, whatever ``rule_seed``."""
    rng = random.Random(derive_seed("bifurcation-rule", rule_seed, num_actions))
    while True:
        actions = list(LETTERS[:num_actions])
        rng.shuffle(actions)
        if all(actions[i] != LETTERS[i] for i in range(num_actions)):
            return {CUES[i]: actions[i] for i in range(num_actions)}


def valid_actions(num_actions: int, variant: str = "decisive") -> str:
    """The valid action letters: ``A, B, ...`` (``num_actions`` of them), then ``S`` (stop) with
    ``variant=varh``."""
    return LETTERS[:num_actions] + (STOP_ACTION if variant == "varh" else "")


def parse_action(action_text: str, num_actions: int, variant: str = "decisive") -> Optional[str]:
    """The valid letter ``action_text`` denotes, or None (invalid)."""
    a = action_text.strip() if isinstance(action_text, str) else None
    return a if a is not None and len(a) == 1 and a in valid_actions(num_actions, variant) else None


def format_action(letter: str) -> str:
    """The exact text a well-formatted policy emits for ``letter`` (``"A\\n"``)."""
    return ACTION_FORMAT.format(letter)
