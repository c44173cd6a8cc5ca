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


def _build(**family):
    family = BifurcationFamily(BifurcationConfig(horizon=3, num_decisive=1, num_actions=2, slip_prob=0.0, **family))
    texts = [p + "".join(a + o for a, o in steps) for p, steps in family.warmup_corpus(32, 0)]
    tok = build_tokenizer(300, texts)
    player = SlotPlayer(family=family, engine=UniformLetters(tok, "AB"), tokenizer=tok,
                        rollout=RolloutConfig(tasks_per_iteration=8, group_size=4))
    envb = build_env_batch(family, 8, 4, family.pool_size("train"), 0, 3)
    batch, _, _ = player.play(envb.slots, 11, 1.0)
    return family, player, envb, batch


@pytest.fixture(scope="module")
def setup():
    """Horizon 3, one decisive turn, two letters, no slips: after the decisive turn the outcome is
    fixed (any valid letter keeps the episode on track), before it it is a coin flip."""
    return _build()


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


# --------------------------------------------------------------------------------------------
# the model-based counterfactual (credit.counterfactual_outcome=model): an LLM predicts the outcome
# --------------------------------------------------------------------------------------------


class RuleFollower(RolloutEngine):
    """Test policy for the replays' continuations: the family's hidden rule applied to the last cue of
    the context (``B`` on a turn without one) — a deterministic expert, so that on bifurcation without
    distractors and slips the outcome after a counterfactual action is a function of the turns the
    judge is shown: the decisive turn ahead is always taken right, the one behind is as it was."""

    name = "rule-follower"

    def __init__(self, tok, family):
        self.tok, self.rule = tok, family.rule
        self.stats = {"forward_passes": 0}

    def letter(self, text: str) -> str:
        cue = text.rsplit("cue ", 1)[-1].split()[0] if "cue " in text else "-"
        return self.rule.get(cue, "B")

    def _generate(self, requests, max_new_tokens, stop_token_ids, temperature, top_p):
        self.stats["forward_passes"] += 1
        out = []
        for r in requests:
            ids = self.tok.encode(format_action(self.letter(self.tok.decode(r.context_ids))), add_special_tokens=False)
            out.append(GenerationOutput(ids, [0.0] * len(ids), [0.0] * len(ids), "stop"))
        return out


class TableJudge:
    """Test double of an LLM judge (``prompt_scores``): each prompt's answer looked up in a table
    (nan for a prompt it was not given), with the counters real judges keep."""

    def __init__(self, table: dict[str, float]):
        self.table, self.calls, self.prompt_tokens, self.completion_tokens, self.forward_passes = table, 0, 0, 0, 0
        self.asked: list[str] = []

    def prompt_scores(self, prompts):
        self.calls += len(prompts)
        self.forward_passes += 1
        self.prompt_tokens += sum(len(p.split()) for p in prompts)
        self.asked += list(prompts)
        return torch.tensor([self.table.get(p, float("nan")) for p in prompts])


class ConstJudge(TableJudge):
    def __init__(self, c: float):
        super().__init__({})
        self.c = c

    def prompt_scores(self, prompts):
        super().prompt_scores(prompts)
        return torch.full((len(prompts),), self.c)


class SampleThenReplay:
    """The ``mc_rollouts`` provider of the model tests: counterfactual actions sampled by the batch's
    policy (uniform letters), replays continued by :class:`RuleFollower` (a deterministic policy)."""

    def __init__(self, sampler: MCContinuations, replayer: MCContinuations):
        self.sample_actions, self._replayer = sampler.sample_actions, replayer

    def __call__(self, starts, k, replacements=None):
        return self._replayer(starts, k, replacements=replacements)


def _true_outcome(family, follower, slot, turns_before, action: str) -> float:
    """Independent reference: a fresh environment through the recorded turns, ``action``, then the
    rule follower's letter for each observation until the end; the terminal reward."""
    env = family.make(slot.instance, episode_seed=slot.episode_seed)
    env.reset()
    for turn in turns_before:
        env.step(turn.action_text)
    r = env.step(action)
    while not r.done:
        r = env.step(format_action(follower.letter(r.observation)))
    return float(r.info.get("terminal_reward", r.reward))


@pytest.fixture(scope="module")
def model_setup():
    """The module's task without distractor cues (only the decisive turn shows a cue, so a turn's
    text determines its outcome, as a judge needs), a deterministic-continuation replayer, and the
    table of true outcomes of every (trajectory, turn, letter) counterfactual, keyed by the prompt
    the method asks the judge."""
    from stages.reward.judge_prompts import counterfactual_outcome_prompt

    setup = _build(distractors=False)
    family, player, envb, batch = setup
    follower = RuleFollower(player.tokenizer, family)
    const = SlotPlayer(family=family, engine=follower, tokenizer=player.tokenizer, rollout=player.rollout)
    slots = {s.uid: s for s in envb.slots}
    table: dict[str, float] = {}
    for tr in batch.trajectories:
        for t in range(len(tr.turns)):
            for letter in "AB":
                p = counterfactual_outcome_prompt(tr, t, format_action(letter))
                v = _true_outcome(family, follower, slots[tr.uid], tr.turns[:t], format_action(letter))
                assert table.setdefault(p, v) == v, "two counterfactuals with one prompt and different outcomes"
                table[p] = v
    return setup, const, table


def _model_ctx(setup, const, judge, seed=5):
    family, player, envb, batch = setup
    mc = SampleThenReplay(MCContinuations(player, envb, batch, lambda name: seed),
                          MCContinuations(const, envb, batch, lambda name: seed))
    return CreditContext(mc_rollouts=mc, judge=judge, default_action=family.default_action), mc


@pytest.mark.parametrize("counterfactual", ["default", "resample"])
def test_model_with_a_true_outcome_judge_equals_the_replay(model_setup, counterfactual):
    """Defining property of counterfactual_outcome=model: the credit is the realized return-to-go
    minus the judge's predicted outcome of each counterfactual action. With a stub judge that answers
    the *true* outcome of the counterfactual (deterministic transitions and continuation, computed
    independently of the method), it equals the replay's credit on every turn: for ``default``
    against C3's own replay mode, for ``resample`` against the real replays of the same sampled
    actions (``compare_replay``). Wrong wirings fail: asking about the real action instead of the
    counterfactual, or pairing predictions with the wrong turns, gives a different credit."""
    setup, const, table = model_setup
    batch = setup[3]
    judge = TableJudge(table)
    ctx, mc = _model_ctx(setup, const, judge)
    k = 1 if counterfactual == "default" else 4
    cfg = dict(k=k, counterfactual=counterfactual)
    res = C3(C3Config(counterfactual_outcome="model", compare_replay=True, **cfg))(batch.to_tensors(), batch, ctx)
    present = ~torch.isnan(res.credit)
    assert res.stats["unparsed_predictions"] == 0 and res.stats["model_predictions"] == len(judge.asked)
    assert res.stats["compare_credit_abs_diff"] == 0.0 and res.stats["compare_outcome_mae"] == 0.0
    assert res.stats["compare_spearman"] == pytest.approx(1.0)
    assert bool((res.credit[present] != 0).any())  # not the degenerate all-zero credit
    if counterfactual == "default":
        # C3's own replay mode, the deterministic continuation: the same credit on every turn
        rep = C3(C3Config(**cfg))(batch.to_tensors(), batch, CreditContext(mc_rollouts=mc, default_action=setup[0].default_action))
        assert torch.equal(res.credit[present], rep.credit[present])
        assert all("action: A\n" in p for p in judge.asked)  # the default letter, never the real one
    else:
        letters = {p.split("action: ")[-1][0] for p in judge.asked}
        assert letters == {"A", "B"}  # the policy really resampled (both letters), not the real action
    # a judge asked about the real action (the wrong wiring) answers the realized outcome: credit 0
    real_table = {}
    for tr in batch.trajectories:
        for t, turn in enumerate(tr.turns):
            from stages.reward.judge_prompts import counterfactual_outcome_prompt
            for letter in "AB":
                real_table[counterfactual_outcome_prompt(tr, t, format_action(letter))] = table[
                    counterfactual_outcome_prompt(tr, t, turn.action_text)]
    wrong = C3(C3Config(counterfactual_outcome="model", **cfg))(batch.to_tensors(), batch, _model_ctx(setup, const, TableJudge(real_table))[0])
    assert not torch.equal(wrong.credit[present], res.credit[present])


@pytest.mark.parametrize("counterfactual", ["default", "resample"])
def test_model_with_a_constant_judge_is_the_realized_return_minus_the_constant(model_setup, counterfactual):
    """A judge that says nothing (P(success) = c for every counterfactual) makes the baseline c on
    every turn: the credit is ``G_t(real) - c`` exactly (the documented relation), not 0."""
    setup, const, _ = model_setup
    batch = setup[3]
    ctx, _ = _model_ctx(setup, const, ConstJudge(0.25))
    res = C3(C3Config(counterfactual_outcome="model", k=3, counterfactual=counterfactual))(batch.to_tensors(), batch, ctx)
    from stages.credit.methods.counterfactual import realized_returns_to_go

    real = realized_returns_to_go(batch, res.credit.shape[1])
    present = ~torch.isnan(real)
    assert torch.equal(torch.isnan(res.credit), ~present)
    assert torch.allclose(res.credit[present], real[present] - 0.25)


def test_model_spends_judge_tokens_not_environment_steps(model_setup):
    """Overhead of counterfactual_outcome=model: the policy's samples of the counterfactual actions
    (2 generated tokens each: letter + newline) and one judge query per counterfactual; no environment
    reset, fork or step. compare_replay records the replay's side beside it (env steps, forks) and
    the cost ratios."""
    setup, const, table = model_setup
    batch = setup[3]
    k = 3
    n_turns = sum(len(t.turns) for t in batch.trajectories)
    judge = TableJudge(table)
    ctx, _ = _model_ctx(setup, const, judge)
    res = C3(C3Config(counterfactual_outcome="model", k=k))(batch.to_tensors(), batch, ctx)
    o = res.overhead
    assert o.env_steps == 0 and o.env_resets == 0 and o.env_restores == 0
    assert o.judge_calls == k * n_turns == judge.calls and o.extra_tokens == 2 * k * n_turns
    assert o.forward_tokens >= judge.prompt_tokens > 0
    assert res.stats["counterfactual_replays"] == 0 and res.stats["model_env_steps"] == 0
    cmp = C3(C3Config(counterfactual_outcome="model", k=k, compare_replay=True))(batch.to_tensors(), batch, _model_ctx(setup, const, TableJudge(table))[0])
    s = cmp.stats
    assert s["model_env_steps"] == 0 and s["replay_env_steps"] > 0 and s["replay_env_forks"] > 0
    assert s["replay_judge_calls"] == 0 and s["model_judge_calls"] == k * n_turns
    assert s["cost_ratio_env_steps"] == 0.0 and s["counterfactual_replays"] == k * n_turns
    assert cmp.overhead.env_steps == s["replay_env_steps"] and cmp.overhead.judge_calls == k * n_turns
    # the ground-truth comparison is there on bifurcation (exact per-turn advantages)
    assert 0.0 <= s["compare_model_gt_sign_accuracy"] <= 1.0 and 0.0 <= s["compare_replay_gt_sign_accuracy"] <= 1.0


def test_model_differs_from_grpo_where_the_outcome_is_decided(model_setup):
    """Differential vs GRPO, as for replay C3: with the true-outcome judge the routine turns after the
    decisive one get exactly 0 (the counterfactual cannot change a decided outcome) where GRPO gives
    every token of a mixed group's row its non-zero outcome advantage."""
    setup, const, table = model_setup
    batch = setup[3]
    t = batch.to_tensors()
    grpo = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]
    ctx, _ = _model_ctx(setup, const, TableJudge(table))
    res = C3(C3Config(counterfactual_outcome="model", k=2))(t, batch, ctx)
    _, dec, after = _exact(batch)
    on = t.response_mask != 0
    after_tok = after.gather(1, t.turn_ids.clamp(min=0)) & on & (t.turn_ids >= 0)
    mixed = [b for b in range(len(batch)) if float(grpo[b][on[b]].abs().max()) > 1e-6 and after_tok[b].any()]
    assert mixed
    for b in mixed:
        assert bool((res.advantages[b][after_tok[b]] == 0).all()) and bool((grpo[b][after_tok[b]] != 0).all())
    assert not torch.allclose(res.advantages, grpo)


def test_ccpo_model_with_a_true_outcome_judge_is_the_outcome_difference(model_setup):
    """CCPO with counterfactual_outcome=model: both arms predicted, ATE = P(success | real action) -
    P(success | default action); with the true-outcome judge and the deterministic continuation
    it equals CCPO's replay credit (compare_replay) turn by turn."""
    setup, const, table = model_setup
    batch = setup[3]
    ctx, _ = _model_ctx(setup, const, TableJudge(table))
    res = CCPO(CCPOConfig(counterfactual_outcome="model", counterfactual="default", compare_replay=True, k=2))(
        batch.to_tensors(), batch, ctx)
    assert res.stats["compare_credit_abs_diff"] == 0.0 and res.stats["unparsed_predictions"] == 0
    assert bool((res.credit[~torch.isnan(res.credit)] != 0).any())


def test_model_config_errors_are_one_line():
    from flows.config import ConfigError, load_config

    for over, pat in ((["credit.compare_replay=true"], r"credit.compare_replay.*needs credit.counterfactual_outcome=model"),
                      (["credit.judge=openai"], r"credit.judge.*read only with credit.counterfactual_outcome=model"),
                      (["credit.counterfactual_outcome=oracle"], r"credit.counterfactual_outcome")):
        with pytest.raises(ConfigError, match=pat) as exc:
            load_config(["env=bifurcation", "credit=c3", *over])
        assert "\n" not in str(exc.value)
    cfg = load_config(["env=bifurcation", "credit=ccpo", "credit.counterfactual_outcome=model", "credit.compare_replay=true"])
    assert cfg.credit.counterfactual_outcome == "model"
    assert C3(C3Config(counterfactual_outcome="model", counterfactual="default")).needs == frozenset({"judge", "default_action"})
