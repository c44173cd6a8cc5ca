"""C3 (Chen et al. 2026) and CCPO (Li et al. 2026c): counterfactual turn credit by real replay
(survey §5), on bifurcation, whose exact MDP gives every turn's exact advantage.

The environments, the agent loop, the continuation provider (:class:`MCContinuations`: fork by
snapshot, force or resample the turn's action, play the rest, verify) are the real ones. The
*policy* is a seeded uniform-letter engine, so that the task's reference policy (uniform over the
valid letters, :meth:`BifurcationEnv.ground_truth`) is the policy being credited and the exact
advantages are the ground truth's."""

from __future__ import annotations

import math
import random

import pytest
import torch

from environments.construct import build_env_batch
from environments.start import SlotPlayer
from environments.tasks.bifurcation import BifurcationConfig, BifurcationFamily, format_action
from stages.credit import functional as F
from stages.credit.base import CreditContext
from stages.credit.methods.counterfactual import C3, CCPO, C3Config, CCPOConfig
from stages.rollout.config import RolloutConfig
from stages.rollout.continuations import MCContinuations
from stages.rollout.engine import GenerationOutput, RolloutEngine
from stages.rollout.policy import build_tokenizer


class UniformLetters(RolloutEngine):
    """Test policy: one uniform valid letter and ``"\\n"`` per turn, drawn from the request's seed."""

    name = "uniform-letters"

    def __init__(self, tok, letters: str):
        self.tok, self.letters = tok, letters
        self.stats = {"forward_passes": 0}

    def _generate(self, requests, max_new_tokens, stop_token_ids, temperature, top_p):
        self.stats["forward_passes"] += 1
        out = []
        for r in requests:
            ids = self.tok.encode(format_action(random.Random(r.seed).choice(self.letters)), add_special_tokens=False)
            out.append(GenerationOutput(ids, [-math.log(len(self.letters))] * len(ids), [0.0] * len(ids), "stop"))
        return out


@pytest.fixture(scope="module")
def setup():
    """Horizon 3, one decisive turn, two letters, no slips: after the decisive turn the outcome is
    fixed (any valid letter keeps the episode on track), before it it is a coin flip."""
    family = BifurcationFamily(BifurcationConfig(horizon=3, num_decisive=1, num_actions=2, slip_prob=0.0))
    texts = [p + "".join(a + o for a, o in steps) for p, steps in family.warmup_corpus(32, 0)]
    tok = build_tokenizer(300, texts)
    player = SlotPlayer(family=family, engine=UniformLetters(tok, "AB"), tokenizer=tok,
                        rollout=RolloutConfig(tasks_per_iteration=8, group_size=4))
    envb = build_env_batch(family, 8, 4, family.pool_size("train"), 0, 3)
    batch, _, _ = player.play(envb.slots, 11, 1.0)
    return family, player, envb, batch


def _credit(method, setup, seed=5):
    family, player, envb, batch = setup
    mc = MCContinuations(player, envb, batch, lambda name: seed)
    ctx = CreditContext(mc_rollouts=mc, default_action=family.default_action)
    return method(batch.to_tensors(), batch, ctx), mc


def _exact(batch):
    """(B, K) exact advantages, decisive flags and the turn index of each row's decisive turn."""
    B, K = len(batch), max(len(t.turns) for t in batch.trajectories)
    adv, dec = torch.full((B, K), float("nan")), torch.zeros((B, K), dtype=torch.bool)
    for b, t in enumerate(batch.trajectories):
        adv[b, :len(t.turns)] = torch.tensor(t.ground_truth.advantage)
        dec[b, :len(t.turns)] = torch.tensor(t.ground_truth.decisive)
    pos = torch.arange(K).unsqueeze(0)
    after = pos > dec.float().argmax(-1, keepdim=True)  # turns after the decisive one
    return adv, dec, after


def test_ccpo_converges_to_the_exact_advantage_of_every_turn(setup):
    """Defining property (ATE by replay): with many replays per arm each turn's credit approaches
    Q(s_t, a_t) - V(s_t): the decisive turn's +-1/2, every routine turn's 0 (an outcome-for-every-turn
    implementation gives the routine turns after the decisive one their outcome, 0 or 1)."""
    res, _ = _credit(CCPO(CCPOConfig(k=96)), setup)
    adv, dec, after = _exact(setup[3])
    present = ~torch.isnan(adv)
    assert bool(dec.any(-1).all()) and bool(((adv[dec]).abs() - 0.5).abs().lt(1e-9).all())  # the exact task
    err = (res.credit - adv)[present].abs()
    assert float(err.mean()) < 0.08, err
    assert bool(torch.sign(res.credit[dec]).eq(torch.sign(adv[dec])).all())  # every decisive turn's sign
    assert float((res.credit[dec] - adv[dec]).abs().max()) < 0.3
    # after the decisive turn both arms are deterministic: exactly 0, in every episode
    assert torch.equal(res.credit[after & present], torch.zeros(int((after & present).sum())))
    outcome = torch.tensor([t.reward for t in setup[3].trajectories])
    assert float(outcome.mean()) > 0.1  # so the degenerate "outcome on every turn" would fail the check above


def test_c3_approaches_the_exact_advantage_on_decisive_turns_and_zero_on_routine_ones(setup):
    """Defining property (realized outcome minus LOO mean of k counterfactual replays): the decisive
    turn's credit approaches its exact advantage in every episode (the realized outcome after it is
    fixed); routine turns after it get exactly 0; routine turns before it get 0 only on average
    (the realized outcome is one sample of Q): their mean over episodes is near 0."""
    res, _ = _credit(C3(C3Config(k=96)), setup)
    adv, dec, after = _exact(setup[3])
    present = ~torch.isnan(adv)
    assert float((res.credit[dec] - adv[dec]).abs().max()) < 0.2
    assert torch.equal(res.credit[after & present], torch.zeros(int((after & present).sum())))
    before = present & ~dec & ~after
    assert int(before.sum()) >= 8
    assert abs(float(res.credit[before].mean())) < 0.25
    # per episode a routine turn before the decisive one carries (outcome - V): +-1/2-ish, not 0
    assert float(res.credit[before].abs().mean()) > 0.3
    # tokens: the turn credit on the turn's action tokens, 0 on observations
    t = setup[3].to_tensors()
    on = t.response_mask != 0
    tok = res.credit.nan_to_num(0.0).gather(1, t.turn_ids.clamp(min=0))
    assert torch.allclose(res.advantages[on], tok[on]) and bool((res.advantages[~on] == 0).all())


def test_replays_really_run_and_are_counted(setup):
    """k replays per turn, each playing the episode from its turn to the end: the environment steps
    counted (beyond the fork's replay of recorded turns) equal the replayed turns; generated tokens are
    the replays' (2 per generated turn: letter + newline; CCPO's forced real action is not generated)."""
    batch = setup[3]
    k = 3
    remaining = sum(len(t.turns) - turn.index for t in batch.trajectories for turn in t.turns)
    n_turns = sum(len(t.turns) for t in batch.trajectories)
    res, mc = _credit(C3(C3Config(k=k)), setup)
    o = res.overhead
    assert res.stats["replayed_turns"] == n_turns and res.stats["counterfactual_replays"] == k * n_turns
    assert o.env_steps - o.env_replay_steps == k * remaining
    assert o.extra_tokens == 2 * k * remaining and o.forward_tokens > 0 and o.extra_forward_passes > 0
    assert o.env_restores > 0 and mc.calls == 1
    res2, mc2 = _credit(CCPO(CCPOConfig(k=k)), setup)
    o2 = res2.overhead
    assert o2.env_steps - o2.env_replay_steps == 2 * k * remaining and mc2.calls == 2
    assert o2.extra_tokens == 2 * k * remaining + 2 * k * (remaining - n_turns)


def test_default_counterfactual_matches_an_independent_replay(setup):
    """counterfactual=default forces the family's default letter at the turn. Independent reference:
    step a fresh environment through the recorded turns before t, the default action at t, then any
    valid letters; on turns at or after the decisive one the outcome is deterministic, so C3's credit
    there is exactly the realized outcome minus that reference outcome."""
    family, _, envb, batch = setup
    res, _ = _credit(C3(C3Config(k=2, counterfactual="default")), setup)
    slots = {s.uid: s for s in envb.slots}
    checked = 0
    for b, tr in enumerate(batch.trajectories):
        d = tr.ground_truth.decisive.index(True)
        for t in range(d, len(tr.turns)):
            env = family.make(slots[tr.uid].instance, episode_seed=slots[tr.uid].episode_seed)
            env.reset()
            for turn in tr.turns[:t]:
                env.step(turn.action_text)
            r = env.step(family.default_action)
            while not r.done:
                r = env.step(format_action("B"))
            expect = tr.reward - float(r.info.get("terminal_reward", r.reward))
            assert res.credit[b, t].item() == pytest.approx(expect), (b, t)
            checked += 1
    assert checked >= len(batch)
    assert bool((res.credit[~torch.isnan(res.credit)] != 0).any())


def test_differs_from_grpo_where_the_outcome_is_decided(setup):
    """Differential vs GRPO on the same batch: GRPO gives every token of a row the same group-normalized
    outcome advantage; C3 gives the routine turns after the decisive one exactly 0 and the decisive turn
    the sign of its own action, whatever the group's other outcomes."""
    batch = setup[3]
    t = batch.to_tensors()
    grpo = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]
    res, _ = _credit(C3(C3Config(k=32)), setup)
    adv, dec, after = _exact(batch)
    on = t.response_mask != 0
    rows_mixed = [b for b in range(len(batch)) if float(grpo[b][on[b]].abs().max()) > 1e-6]
    assert rows_mixed, "every group had one outcome: GRPO gave nothing to compare"
    after_tok = after.gather(1, t.turn_ids.clamp(min=0)) & on & (t.turn_ids >= 0)
    for b in rows_mixed:
        if after_tok[b].any():
            assert bool((res.advantages[b][after_tok[b]] == 0).all()) and bool((grpo[b][after_tok[b]] != 0).all())
    assert bool(torch.sign(res.credit[dec]).eq(torch.sign(adv[dec])).all())


def test_config_errors_are_one_line():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^credit.counterfactual=default: needs the family's default action and "
                                          r"env.name=math declares none"):
        load_config(["env=math", "credit=c3", "credit.counterfactual=default"])
    with pytest.raises(ConfigError, match=r"credit.k"):
        load_config(["env=bifurcation", "credit=ccpo", "credit.k=1"])  # an ATE needs k >= 2 replays per arm
    with pytest.raises(ConfigError, match=r"credit.counterfactual"):
        load_config(["env=bifurcation", "credit=c3", "credit.counterfactual=oracle"])
    cfg = load_config(["env=bifurcation", "credit=c3", "credit.counterfactual=default"])
    assert cfg.credit.counterfactual == "default"
    assert C3(C3Config(counterfactual="default")).needs == frozenset({"mc_rollouts", "default_action"})
    with pytest.raises(ValueError, match=r"needs \['default_action'\]"):
        C3(C3Config(counterfactual="default"))(None, None, CreditContext(mc_rollouts=object()))


@pytest.mark.parametrize("method", ["c3", "ccpo"])
def test_one_train_flow_iteration_on_bifurcation(prefect_harness, shared_home, method):
    """The real train flow: Prefect tasks, the mc_rollouts provider (the run's live policy and
    environments), the family's default action (counterfactual=default for CCPO), MLflow metrics."""
    from flows import api

    extra = ["credit.counterfactual=default"] if method == "ccpo" else []
    out = api.start_run(["env=bifurcation", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=2",
                         "eval_episodes=2", "tracking.heatmap_every=0", f"credit={method}", "credit.k=2", *extra],
                        home=shared_home, progress=False)
    run = api.tracker_for(shared_home).client.get_run(out["mlflow_run_id"])
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["creditflow.method"] == method
    assert run.data.params["credit.k"] == "2"
    turns = m["credit.method.replayed_turns"]
    assert turns >= 4  # 4 episodes of at least one turn, every turn replayed
    arms = 2 if method == "ccpo" else 1
    assert m["credit.method.counterfactual_replays"] == arms * 2 * turns
    # each replay plays from its turn to the episode's end: at least one real step per replay
    assert m["overhead.credit.env_steps"] - m["overhead.credit.env_replay_steps"] >= arms * 2 * turns
    assert m["overhead.credit.extra_tokens"] > 0 and m["overhead.credit.forward_tokens"] > 0
    assert 0.0 <= m["credit.method.counterfactual_baseline_mean"] <= 1.0 + 1e-6
    assert "update.loss" in m
