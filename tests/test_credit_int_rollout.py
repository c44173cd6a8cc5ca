"""InT (Yang et al. 2026; survey §3.3.1) with real interventions: on the math family the
episode is really continued from a rewritten step (environment restored by replay, the rewrite
taken as the action, the policy continuing, the family's verifier scoring it).

Only the *judge* is a test double (it flags every step and writes the rewrites from the
reference solution that InT shows it); the environment, the continuation provider, the policy
and the verifier are the real ones of a ``run_plain`` iteration."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from flows.api import run_plain
from stages.credit import functional as F
from stages.credit.registry import _METHODS, register_method
from stages.credit.methods.critic_llm import InT, InTConfig

SEEN: dict = {}


class ReferenceProposer:
    """Judge double: every step is wrong; the rewrite of step 0 is the reference answer (it must
    rescue the failed trace), any later step's rewrite is a wrong answer (inconsequential: the
    trace fails either way). ``mode="flat"``: step 0 gets a wrong answer too; ``mode="continue"``:
    step 0 is rewritten to the reference's first (non-answer) step, so the policy must go on."""

    def __init__(self, mode: str = "rescue"):
        self.mode, self.calls, self.prompts = mode, 0, []

    def step_verdicts(self, batch):
        K = max(len(t.turns) for t in batch.trajectories)
        v = torch.full((len(batch), K), float("nan"))
        for i, t in enumerate(batch.trajectories):
            v[i, : len(t.turns)] = 0.0
        self.calls += int((v == 0).sum())
        return v

    def propose(self, prompts, max_new_tokens):
        self.calls += len(prompts)
        self.prompts += prompts
        out = []
        for p in prompts:
            ref = p.split("Reference solution:\n")[1].split("\nProblem")[0].split("\nPrevious steps:")[0]
            ref = ref.split("\nThis next step is wrong:")[0].splitlines()
            answer = ref[-1].removeprefix("answer ")
            first = "Previous steps:" not in p
            if first and self.mode == "rescue":
                out.append(f"answer {answer}")
            elif first and self.mode == "continue":
                out.append(ref[0] if len(ref) > 1 else "1+1=2")
            else:
                out.append(f"answer {answer}0001")
        return out


@dataclass
class ProbeConfig(InTConfig):
    method: str = "test-int-probe"  # test method: InT with a scripted judge
    candidates: str = "flagged"  # intervene on every flagged step
    k: int = 2  # two continuations per intervention


class InTProbe(InT):
    name = "test-int-probe"
    Config = ProbeConfig

    def assign(self, tensors, batch, ctx):
        SEEN["grpo"] = F.grpo(tensors.token_level_rewards, tensors.response_mask, tensors.index)[0]
        SEEN["turn_ids"], SEEN["mask"] = tensors.turn_ids, tensors.response_mask
        SEEN["success"] = [t.success for t in batch.trajectories]
        SEEN["turns"] = [len(t.turns) for t in batch.trajectories]
        results = {}
        for mode in ("rescue", "flat", "continue"):
            judge = ReferenceProposer(mode)
            ctx.judge = judge
            results[mode] = super().assign(tensors, batch, ctx)
            SEEN[f"prompts_{mode}"] = judge.prompts
        SEEN["results"] = results
        return results["rescue"]


if InTProbe.name not in _METHODS:
    register_method(InTProbe)


def test_int_rolls_out_interventions_and_credits_the_outcome_change(shared_home):
    SEEN.clear()
    run_plain(["experiment=math", "credit=test-int-probe", "iterations=1", "rollout.tasks_per_iteration=4",
               "rollout.group_size=2", "eval_episodes=2", "env.max_steps=3"], home=shared_home)
    res, flat, cont = (SEEN["results"][m] for m in ("rescue", "flat", "continue"))
    grpo, turn_ids, mask = SEEN["grpo"], SEEN["turn_ids"], SEEN["mask"]
    failed = [b for b, s in enumerate(SEEN["success"]) if not s]
    assert failed, "the tiny policy solved every problem: nothing to intervene on"
    iv = res.records["interventions"]
    assert len(iv) == sum(SEEN["turns"][b] for b in failed)  # every step of every failed trace
    assert all("Reference solution:" in p for p in SEEN["prompts_rescue"])  # math has a reference: shown
    assert res.stats["interventions_with_reference"] == len(iv)
    # the real verifier: the reference answer rescues every failed trace, a wrong answer never does
    for r in iv:
        assert r["original_return"] == 0.0 and len(r["intervened_returns"]) == 2
        if r["step"] == 0:
            assert r["intervened_returns"] == [1.0, 1.0] and r["effect"] == 1.0, r
        else:
            assert r["intervened_returns"] == [0.0, 0.0] and r["effect"] == 0.0, r
        assert r["continuations"] and r["continuations"][0][0] == r["replacement"]
    # defining property: the step whose intervention flips the outcome carries the failure (less
    # credit than GRPO's by penalty x 1); steps whose intervention is inconsequential keep GRPO's
    for b in range(len(SEEN["success"])):
        on = mask[b] > 0
        step0 = on & (turn_ids[b] == 0)
        if b in failed:
            assert torch.allclose(res.advantages[b][step0], grpo[b][step0] - 1.0, atol=1e-6)
            assert torch.allclose(res.advantages[b][on & ~step0], grpo[b][on & ~step0], atol=1e-6)
        else:
            assert torch.allclose(res.advantages[b][on], grpo[b][on], atol=1e-6)
    assert not torch.allclose(res.advantages, grpo.to(res.advantages.dtype))  # not GRPO in disguise
    # the advantages depend on the proposals: with no rescuing rewrite they are GRPO's
    assert torch.allclose(flat.advantages, grpo.to(flat.advantages.dtype), atol=1e-6)
    assert flat.stats["interventions_outcome_changed"] == 0 and res.stats["interventions_outcome_changed"] == len(failed)
    # continuation compute is counted: one fresh environment per continuation, those after step 0
    # restored from a snapshot (one more environment per episode, replayed once to the forks)
    late = [r for r in iv if r["step"] > 0]
    assert res.overhead.env_restores == 2 * len(late)
    assert 2 * len(iv) + bool(late) <= res.overhead.env_resets <= 2 * len(iv) + len(late)
    assert res.overhead.env_replay_steps >= max((r["step"] for r in iv), default=0)
    assert res.overhead.env_steps - res.overhead.env_replay_steps >= 2 * len(iv)
    assert res.overhead.judge_calls > 0
    assert res.overhead.extra_tokens == 0  # an imposed rewrite is not generated (answer rewrites end the episode)
    # a non-terminal rewrite: the policy generates the rest of the episode from the rewritten prefix
    civ = [r for r in cont.records["interventions"] if r["step"] == 0]
    assert civ and all(len(c) >= 2 and c[0] == r["replacement"] for r in civ for c in r["continuations"])
    assert cont.overhead.extra_tokens > 0 and cont.overhead.extra_forward_passes > 0
    for r in civ:
        assert r["effect"] == sum(r["intervened_returns"]) / 2 and 0.0 <= r["effect"] <= 1.0
