"""Oracle credit (stages/credit/methods/oracle.py): exact advantages by DP on the task's MDP.

Its credit equals the family's own exact (rational-arithmetic) DP under the reference policy,
equals a brute-force expectation over every future under the current policy, gives routine turns
no credit where no action can matter, and differs from GRPO exactly where credit matters."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from environments.tasks.bifurcation import BifurcationConfig, BifurcationFamily, format_action
from environments.tasks.bifurcation_config import valid_actions
from stages.benchmark import metrics as M
from stages.benchmark.oracle import played_advantages, policy_values, stack_mdps
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.schema import Batch, Trajectory, Turn


class CharTokenizer:
    """Test double of a tokenizer: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


class TableScorer:
    """Test double of the policy scorer: the probability of action text ``x`` at turn t is
    ``table[t][x]`` (turn = number of newlines in the context after the prompt); the whole
    log-prob sits on the target's first token."""

    def __init__(self, table):
        self.table, self.forward_passes, self.pairs = table, 0, 0

    def __call__(self, contexts, targets):
        self.forward_passes += 1
        self.pairs += len(contexts)
        out = []
        for c, tgt in zip(contexts, targets):
            t = sum(1 for x in c[1:] if x == ord("\n"))
            lp = torch.zeros(len(tgt), dtype=torch.float64)
            lp[0] = math.log(self.table[t]["".join(chr(i) for i in tgt)])
            out.append(lp)
        return out


def _episode(fam, inst, seed, rng, letters, p_invalid=0.2):
    """Play one episode with random actions; token ids are the characters of the transcript
    (prompt = one token, so the scorer double can count turns by newlines)."""
    env = fam.make(inst, episode_seed=seed)
    env.reset()
    resp, mask, turns = [], [], []
    while not env.done:
        key = env.state_key()
        a = "?" if rng.random() < p_invalid else rng.choice(letters)  # sometimes an invalid action
        text = format_action(a)
        s = len(resp)
        resp += [ord(c) for c in text]
        mask += [True] * len(text)
        res = env.step(text)
        e = len(resp)
        obs = res.observation
        resp += [ord(c) for c in obs] if obs else []
        mask += [False] * len(obs)
        turns.append(Turn(index=len(turns), action_span=(s, e), obs_span=(e, len(resp)), action_text=text,
                          observation=obs, reward=float(res.info.get("turn_reward", 0.0)), state_key=key,
                          action=res.action))
    return Trajectory(uid=f"{inst.task_id}-{seed}", group_id=hash(inst.task_id) % 1000, task_id=inst.task_id,
                      env_name="bifurcation", prompt_ids=[1], response_ids=resp, policy_mask=mask,
                      logprobs=[0.0] * len(resp), entropies=[0.0] * len(resp), turns=turns,
                      reward=1.0 if res.success else 0.0, success=res.success,
                      ground_truth=env.ground_truth(env.actions)), env


def _batch(cfg, n_inst=3, per=4, seed=0, p_invalid=0.2):
    fam = BifurcationFamily(cfg)
    rng = random.Random(seed)
    letters = list(valid_actions(cfg.num_actions, cfg.variant))
    trajs, envs = [], []
    for g, inst in enumerate(fam.instances("train", n_inst, seed=seed)):
        for k in range(per):
            tr, env = _episode(fam, inst, 10 * g + k, rng, letters, p_invalid)
            tr.group_id = g
            trajs.append(tr)
            envs.append(env)
    return fam, Batch(trajs), envs


CONFIGS = [
    dict(horizon=5, num_decisive=2, num_actions=2),
    dict(horizon=6, num_decisive=2, num_actions=3, slip_prob=0.2, decisive_reward=0.5),
    dict(horizon=5, num_decisive=3, num_actions=2, terminate_on_error=True, slip_prob=0.1),
    # the variants of issue 15 (stochastic: slips)
    dict(variant="recovery", horizon=6, num_decisive=3, num_actions=2, slip_prob=0.2),
    dict(variant="recovery", horizon=5, num_decisive=2, num_actions=3, terminate_on_error=True, decisive_reward=0.5),
    dict(variant="varh", horizon=6, num_decisive=2, num_actions=2, slip_prob=0.2, continue_cost=0.05),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_generic_dp_equals_the_family_exact_dp_under_the_reference_policy(kw):
    """Uniform over valid letters (and, for ``optimal``, the answer at decisive turns) reproduces
    the family's rational-arithmetic ground truth on every played turn. (The optimal policy of the
    recovery and varh variants depends on the state, not only the turn: uniform only there.)"""
    for ref in ("uniform", "optimal") if kw.get("variant", "decisive") == "decisive" else ("uniform",):
        cfg = BifurcationConfig(reference_policy=ref, **kw)
        _, batch, _ = _batch(cfg)
        mdps = [t.ground_truth.mdp for t in batch.trajectories]
        n_valid = len(valid_actions(cfg.num_actions, cfg.variant))
        B, H, A = len(mdps), cfg.horizon, n_valid + 1
        probs = torch.zeros(B, H, A, dtype=torch.float64)
        probs[..., :n_valid] = 1.0 / n_valid
        if ref == "optimal":
            for b, tr in enumerate(batch.trajectories):
                spec = BifurcationFamily(cfg).instances("train", 3, seed=0)[b // 4].spec
                for t in spec["decisive"]:
                    probs[b, t] = 0.0
                    probs[b, t, ord(spec["answers"][t]) - ord("A")] = 1.0
        V, Q = policy_values(stack_mdps(mdps), probs)
        states = torch.full((B, H), -1, dtype=torch.long)
        actions = torch.full((B, H), -1, dtype=torch.long)
        for b, (tr, m) in enumerate(zip(batch.trajectories, mdps)):
            states[b, : len(m.states)] = torch.tensor(m.states)
            actions[b, : len(m.states)] = torch.tensor([m.actions.index(x.action) for x in tr.turns])
        adv = played_advantages(V, Q, states, actions)
        for b, tr in enumerate(batch.trajectories):
            n = len(tr.turns)
            assert adv[b, :n].tolist() == pytest.approx(tr.ground_truth.advantage, abs=1e-12), (ref, b)
            assert torch.isnan(adv[b, n:]).all()


def _brute_force_q(env, t, on, a, table, letters, memo=None):
    """Q^pi(s_t = (t, on), a) by enumerating every future action and slip (the env's own
    transition function; history-independent per-turn policy ``table``). ``memo`` caches each
    (t, on, a) of one env: the same exact expectation, without re-walking shared subtrees."""
    memo = {} if memo is None else memo
    if (t, on, a) in memo:
        return memo[(t, on, a)]
    H, slip = env.horizon, float(env.cfg.slip_prob)
    total = 0.0
    for slipped in (False, True):
        p = slip if slipped else 1.0 - slip
        if p == 0.0:
            continue
        slips = [slipped] * H
        on2, r, ended = env._transition(t, on, a, slips)  # on2: the state code (1 = on track)
        if ended or t + 1 == H:  # an episode that ends succeeds iff it is on track
            total += p * (r + (1.0 if on2 == 1 else 0.0))
            continue
        v = sum(table[t + 1][x] * _brute_force_q(env, t + 1, on2, x if x in letters else None, table, letters, memo)
                for x in table[t + 1])
        total += p * (r + v)
    memo[(t, on, a)] = total
    return total


@pytest.mark.parametrize("kw", CONFIGS)
def test_current_policy_oracle_equals_brute_force_expectation(kw):
    cfg = BifurcationConfig(**kw)
    letters = list(valid_actions(cfg.num_actions, cfg.variant))
    rng = random.Random(7)
    table = []
    for _ in range(cfg.horizon):  # a peaked, turn-dependent policy with some invalid mass
        w = [rng.random() ** 3 + 0.01 for _ in letters]
        z = sum(w) / 0.9
        table.append({format_action(x): wx / z for x, wx in zip(letters, w)})
    _, batch, envs = _batch(cfg, per=10, p_invalid=0.05)
    # every turn index is played by some episode (turns after an early end use the batch's mean)
    assert max(len(t.turns) for t in batch.trajectories) == cfg.horizon
    scorer = TableScorer(table)
    method = build_method(get_method_class("oracle").Config())
    tensors = batch.to_tensors(pad_token_id=0)
    res = method(tensors, batch, CreditContext(scorer=scorer, tokenizer=CharTokenizer()))
    assert scorer.forward_passes == 1 and res.overhead.extra_forward_passes == 1
    assert scorer.pairs == sum(len(t.turns) for t in batch.trajectories) * len(letters)
    # the brute force sees the invalid action as the remaining mass
    full = [{**{x.strip(): p for x, p in row.items()}, None: 1.0 - sum(row.values())} for row in table]
    memos: dict = {}
    for b, (tr, env) in enumerate(zip(batch.trajectories, envs)):
        for t, turn in enumerate(tr.turns):
            on = tr.ground_truth.mdp.states[t]  # the realized state (the family's ground truth)
            q = {x: _brute_force_q(env, t, on, x, full, letters, memos.setdefault(b, {})) for x in full[t]}
            v = sum(full[t][x] * q[x] for x in q)
            assert float(res.credit[b, t]) == pytest.approx(q[turn.action] - v, abs=1e-9), (b, t)
        # every policy token of the turn carries the turn's credit, observation tokens none
        for t, turn in enumerate(tr.turns):
            a0, a1 = turn.action_span
            assert torch.allclose(res.advantages[b, a0:a1], res.credit[b, t].float().expand(a1 - a0))
            o0, o1 = turn.obs_span
            assert (res.advantages[b, o0:o1] == 0).all()


def test_routine_credit_vanishes_without_invalid_mass_and_oracle_differs_from_grpo_where_credit_matters():
    """Defining property + differential test against GRPO: with a policy that never emits an
    invalid action, every routine turn gets exactly 0 (no action there changes the outcome) while
    GRPO spreads the episode's credit over them; on decisive turns the oracle has the sign of the
    exact advantage. With the *reference* policy it returns the ground truth itself."""
    cfg = BifurcationConfig(horizon=8, num_decisive=2, num_actions=2, slip_prob=0.1)
    _, batch, _ = _batch(cfg, n_inst=3, per=8, seed=3, p_invalid=0.03)
    table = [{format_action("A"): 0.7, format_action("B"): 0.3} for _ in range(cfg.horizon)]
    tensors = batch.to_tensors(pad_token_id=0)
    ctx = CreditContext(scorer=TableScorer(table), tokenizer=CharTokenizer())
    oracle = build_method(get_method_class("oracle").Config())(tensors, batch, ctx)
    grpo = build_method(get_method_class("grpo").Config())(tensors, batch, ctx)
    t_o, t_g = M.turn_table(batch, tensors, oracle.advantages), M.turn_table(batch, tensors, grpo.advantages)
    valid_routine = (~t_o.decisive) & torch.tensor(
        [tr.turns[t].action is not None for tr in batch.trajectories for t in range(len(tr.turns))])
    assert bool(valid_routine.any())
    assert t_o.credit[valid_routine].abs().max() < 1e-12
    assert t_g.credit[valid_routine].abs().max() > 0.1  # GRPO credits routine turns
    nz = t_o.advantage.abs() > 1e-9
    assert (torch.sign(t_o.credit[nz]) == torch.sign(t_o.advantage[nz])).all()
    assert M.identification(t_o.credit, t_o.advantage)["sign_accuracy"] == 1.0
    assert M.identification(t_g.credit, t_g.advantage)["sign_accuracy"] < 1.0
    # the current policy's advantages are not the uniform reference's (a peaked policy shifts them)
    assert not torch.allclose(t_o.credit, t_o.advantage)
    ref = build_method(get_method_class("oracle").Config(policy="reference"))(tensors, batch, ctx)
    t_r = M.turn_table(batch, tensors, ref.advantages)
    assert torch.allclose(t_r.credit, t_r.advantage, atol=1e-6)


def test_oracle_refuses_trajectories_without_an_mdp():
    cfg = BifurcationConfig(horizon=3, num_decisive=1)
    _, batch, _ = _batch(cfg, n_inst=1, per=2)
    batch.trajectories[0].ground_truth.mdp = None
    with pytest.raises(ValueError, match="exact MDP"):
        build_method(get_method_class("oracle").Config())(
            batch.to_tensors(pad_token_id=0), batch,
            CreditContext(scorer=TableScorer([{}] * 3), tokenizer=CharTokenizer()))


def test_oracle_runs_through_the_flow_with_the_real_policy_scorer(prefect_harness, shared_home):
    """``creditflow train credit=oracle`` on bifurcation: the real policy is scored at every
    played turn (forward passes billed), and the credit agrees in sign with the exact advantage
    on every turn where that is non-zero (decisive turns, invalid actions)."""
    from flows import api

    out = api.start_run(["iterations=1", "rollout.tasks_per_iteration=4", "rollout.group_size=2", "eval_episodes=4",
                         "env.horizon=4", "env.num_decisive=2", "tracking.heatmap_every=0", "credit=oracle"],
                        home=shared_home, progress=False)
    c = api.tracker_for(shared_home).client
    run = c.get_run(out["mlflow_run_id"])
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["creditflow.method"] == "oracle"
    assert m["overhead.credit.extra_forward_passes"] >= 1
    assert m["credit.method.oracle_current_policy"] == 1.0
    assert 0.0 <= m["credit.method.oracle_invalid_mass"] <= 1.0
    assert m["credit.gt_sign_agreement"] == 1.0
    assert m["credit.method.oracle_abs_mean"] > 0
