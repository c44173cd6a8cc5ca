"""IGPO (Wang et al. 2025, survey §5.5) and HCAPO (Tan et al. 2026, survey §5.2): turn credit from
the policy's own teacher-forced beliefs (the ``scorer`` need).

The defining properties are checked with a scripted scorer (a test double of the Scorer protocol
whose log-probs depend on the context in a known way) against reference computations written
here with plain loops; the real scorer (:class:`stages.rollout.scorer.HFScorer` on the tiny Qwen2
policy) is checked against its own recomputation; the flow runs are in
tests/test_methods_flow_turn.py."""

from __future__ import annotations

import math

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit import functional as F
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.schema import Batch, Trajectory, Turn

CLUE, OBS, HINT = 99, 3, 77


class CharTok:
    """A tokenizer double: one id per character (enough for encode_text)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [HINT if c == "!" else 100 + (ord(c) % 50) for c in text]}


class ClueScorer:
    """Scorer double: every target token's log-prob is ``-2 + 0.5 * (#CLUE tokens in the context)``
    (capped at 0): observations carrying the clue raise the belief in the answer."""

    def __init__(self):
        self.forward_passes = 0
        self.prompt_tokens = 0
        self.seen: list = []

    def __call__(self, contexts, targets):
        self.forward_passes += 1
        self.prompt_tokens += sum(len(c) + len(t) for c, t in zip(contexts, targets))
        self.seen.append((contexts, targets))
        return [torch.full((len(t),), min(0.0, -2.0 + 0.5 * c.count(CLUE))) for c, t in zip(contexts, targets)]


def traj(uid, group, obs, reward, answer="7", tokens=2):
    """One episode: turn k = ``tokens`` action tokens then one observation token ``obs[k]``."""
    resp, mask, turns = [], [], []
    for k, o in enumerate(obs):
        a0 = len(resp)
        resp += [10 + k] * tokens
        mask += [True] * tokens
        resp.append(o)
        mask.append(False)
        turns.append(Turn(index=k, action_span=(a0, a0 + tokens), obs_span=(a0 + tokens, a0 + tokens + 1),
                          action_text=f"a{k}", observation="o"))
    n = len(resp)
    return Trajectory(uid=uid, group_id=group, task_id=f"t{group}", env_name="tooluse", prompt_ids=[1, 2],
                      response_ids=resp, policy_mask=mask, logprobs=[0.0] * n, entropies=[0.0] * n, turns=turns,
                      reward=float(reward), success=reward > 0, privileged={"answer": answer})


def run(name, batch, scorer, **cfg):
    method = build_method(get_method_class(name).Config(**cfg))
    t = batch.to_tensors()
    return method(t, batch, CreditContext(scorer=scorer, tokenizer=CharTok())), t


def per_turn(res, t, b, k):
    """The single advantage every token of turn k of row b carries."""
    vals = res.advantages[b][(t.turn_ids[b] == k) & (t.response_mask[b] != 0)]
    assert vals.numel() and torch.allclose(vals, vals[0].expand_as(vals))
    return float(vals[0])


# --------------------------------------------------------------------------- IGPO


def igpo_reference(episodes, gamma=1.0, eps=1e-6):
    """IGPO by hand: p_t = exp(-2 + 0.5 * clues seen up to turn t), r_t = p_t - p_{t-1}, the last
    turn gets the outcome; per group, all turn rewards pooled and normalised; discounted sums."""
    rewards = []
    for obs, R, _ in episodes:
        clues = [0] + [sum(o == CLUE for o in obs[: j + 1]) for j in range(len(obs))]
        p = [math.exp(min(0.0, -2 + 0.5 * c)) for c in clues]
        rewards.append([p[j + 1] - p[j] for j in range(len(obs) - 1)] + [R])
    out = [None] * len(episodes)
    for g in {e[2] for e in episodes}:
        rows = [i for i, e in enumerate(episodes) if e[2] == g]
        pool = torch.tensor([x for i in rows for x in rewards[i]])
        mean, std = pool.mean(), pool.std()
        for i in rows:
            norm = [(x - mean) / (std + eps) for x in rewards[i]]
            out[i] = [sum(gamma ** (j2 - j) * norm[j2] for j2 in range(j, len(norm))) for j in range(len(norm))]
    return out


EPISODES = [([OBS, CLUE, OBS], 1.0, 0), ([OBS, OBS, OBS], 0.0, 0), ([CLUE, CLUE, OBS], 1.0, 0),
            ([OBS, OBS], 0.0, 1), ([OBS, CLUE], 1.0, 1)]


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_igpo_turn_credit_is_the_information_gain_of_the_gold_answer(gamma):
    batch = Batch([traj(f"r{i}", g, obs, R) for i, (obs, R, g) in enumerate(EPISODES)])
    scorer = ClueScorer()
    res, t = run("igpo", batch, scorer, gamma=gamma)
    ref = igpo_reference(EPISODES, gamma)
    for b, (obs, _, _) in enumerate(EPISODES):
        for k in range(len(obs)):
            assert per_turn(res, t, b, k) == pytest.approx(float(ref[b][k]), abs=1e-5)
    # the scorer saw, per row, the prompt and every turn boundary but the last (whose reward is the outcome),
    # each context ending right after a turn's observation, with the gold answer "answer 7" as target
    (contexts, targets), = scorer.seen
    assert len(contexts) == sum(len(e[0]) for e in EPISODES)
    assert contexts[0] == [1, 2] and contexts[1] == [1, 2, 10, 10, OBS] and contexts[2] == [1, 2, 10, 10, OBS, 11, 11, CLUE]
    assert all(tg == CharTok()("answer 7")["input_ids"] for tg in targets)
    assert res.overhead.extra_forward_passes == 1 and res.overhead.forward_tokens > 0
    assert res.stats["positive_gain_fraction"] > 0 and res.granularity == "turn"


def test_igpo_a_clue_turn_gains_and_a_blank_turn_does_not():
    """The property a wrong implementation (credit by position, by outcome only) fails: inside one
    trajectory the turn whose observation reveals the clue is credited above the turn that reveals nothing."""
    batch = Batch([traj("r0", 0, [OBS, CLUE, OBS], 0.0), traj("r1", 0, [OBS, OBS, OBS], 0.0)])
    res, t = run("igpo", batch, ClueScorer(), gamma=0.0)  # gamma=0: each turn's own normalised reward
    assert per_turn(res, t, 0, 1) > per_turn(res, t, 0, 0) and per_turn(res, t, 0, 1) > per_turn(res, t, 1, 1)
    assert per_turn(res, t, 0, 0) == pytest.approx(per_turn(res, t, 1, 0))  # same (zero) gain: same credit


def test_igpo_on_single_turn_episodes_is_grpo():
    """Differential: with one turn per episode the only turn reward is the outcome and the pooled turn
    normalisation is GRPO's group normalisation, so IGPO's advantages are GRPO's exactly."""
    eps = [([OBS], 1.0, 0), ([OBS], 0.0, 0), ([CLUE], 1.0, 0), ([OBS], 0.0, 1), ([OBS], 1.0, 1), ([OBS], 1.0, 1)]
    batch = Batch([traj(f"r{i}", g, obs, R) for i, (obs, R, g) in enumerate(eps)])
    res, t = run("igpo", batch, ClueScorer())
    grpo = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]
    assert torch.allclose(res.advantages, grpo, atol=1e-6)
    # multi-turn: the information gain makes it differ from GRPO inside a trajectory
    batch = Batch([traj(f"r{i}", g, obs, R) for i, (obs, R, g) in enumerate(EPISODES)])
    res, t = run("igpo", batch, ClueScorer())
    assert not torch.allclose(res.advantages, F.grpo(t.token_level_rewards, t.response_mask, t.index)[0], atol=1e-3)


def test_igpo_refuses_families_without_a_gold_answer():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^credit.method=igpo: needs privileged training-time information \(answer "
                                          r"in Trajectory.privileged\) and env.name=bifurcation declares none"):
        load_config(["env=bifurcation", "credit=igpo"])
    load_config(["experiment=math", "credit=igpo"])
    with pytest.raises(ConfigError, match=r"answer_template"):
        load_config(["experiment=math", "credit=igpo", "credit.answer_template=answer"])
    bad = traj("r0", 0, [OBS], 1.0)
    bad.privileged = {}
    with pytest.raises(ValueError, match=r"has no gold answer"):
        run("igpo", Batch([bad, traj("r1", 0, [OBS], 0.0)]), ClueScorer())


# --------------------------------------------------------------------------- HCAPO


class HindsightScorer:
    """Scorer double: an action's token log-prob is -1, plus ``lift[action token]`` when the
    context starts with the outcome statement (the hint's first token, HINT: '!' in CharTok)."""

    def __init__(self, lift):
        self.lift = lift
        self.forward_passes = 0
        self.prompt_tokens = 0

    def __call__(self, contexts, targets):
        self.forward_passes += 1
        return [torch.tensor([-1.0 + (self.lift.get(x, 0.0) if c[0] == HINT else 0.0) for x in t]) for c, t in
                zip(contexts, targets)]


def test_hcapo_credits_the_actions_the_outcome_makes_likely():
    """Defining property: the hindsight ratio rho = pi(a | s, outcome) / pi(a | s) weights the outcome:
    turn k gets A_ep + (1 - 1/rho_k) * A_ep; a success's negative step terms are masked (do no harm)."""
    batch = Batch([traj("r0", 0, [OBS, OBS, OBS], 1.0), traj("r1", 0, [OBS, OBS, OBS], 0.0),
                   traj("r2", 0, [OBS, OBS], 1.0), traj("r3", 0, [OBS, OBS], 0.0)])
    lift = {10: 0.5, 11: -0.3, 12: 0.0}  # turn 0's action is likelier in hindsight, turn 1's less, turn 2's equal
    cfg = dict(success_text="!", failure_text="!")
    res, t = run("hcapo", batch, HindsightScorer(lift), **cfg)
    ep = F._grpo_scalars(t.token_level_rewards.float(), (t.response_mask != 0).float(), t.index, 1e-6, True)
    for b in range(4):
        for k in range(len(batch.trajectories[b].turns)):
            rho = math.exp(max(-math.log(2), min(math.log(2), lift[10 + k])))
            step = (1 - 1 / rho) * float(ep[b])
            if batch.trajectories[b].success:
                step = max(step, 0.0)
            assert per_turn(res, t, b, k) == pytest.approx(float(ep[b]) + step, abs=1e-5)
    # a success: the hindsight-likely action 0 is credited above the neutral action 2; a failure: blamed more
    assert per_turn(res, t, 0, 0) > per_turn(res, t, 0, 2) == pytest.approx(float(ep[0]))
    assert per_turn(res, t, 1, 0) < per_turn(res, t, 1, 2) < 0
    assert per_turn(res, t, 0, 1) == pytest.approx(float(ep[0]))  # do-no-harm: the success's negative term is 0
    assert per_turn(res, t, 1, 1) > float(ep[1])  # ... but a failure's unlikely-in-hindsight action is blamed less
    assert res.stats["do_no_harm_masked"] == 2 and res.overhead.extra_forward_passes == 1
    off, _ = run("hcapo", batch, HindsightScorer(lift), do_no_harm=False, **cfg)
    assert per_turn(off, t, 0, 1) < float(ep[0])


def test_hcapo_with_an_indifferent_hindsight_model_is_grpo():
    """Differential: rho = 1 everywhere (the outcome statement changes nothing) or omega = 0 gives
    GRPO's advantages exactly; an informative hindsight model does not."""
    batch = Batch([traj("r0", 0, [OBS, OBS], 1.0), traj("r1", 0, [OBS, OBS], 0.0), traj("r2", 1, [OBS], 1.0),
                   traj("r3", 1, [OBS, OBS, OBS], 0.0), traj("r4", 1, [OBS], 0.0)])
    t = batch.to_tensors()
    grpo = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]
    res, _ = run("hcapo", batch, HindsightScorer({}))
    assert torch.allclose(res.advantages, grpo, atol=1e-6)
    res, _ = run("hcapo", batch, HindsightScorer({10: 1.0}), step_coef=0.0, success_text="!", failure_text="!")
    assert torch.allclose(res.advantages, grpo, atol=1e-6)
    res, _ = run("hcapo", batch, HindsightScorer({10: 1.0}), success_text="!", failure_text="!")
    assert not torch.allclose(res.advantages, grpo, atol=1e-3)


@pytest.fixture(scope="module")
def tiny():
    from stages.rollout.config import ModelConfig
    from stages.rollout.policy import build_tiny_policy

    torch.set_num_threads(1)
    texts = ["This episode ended in success.\nsearch a\nanswer 7\n", "calc 3+4\nanswer 7\n"] * 4
    return build_tiny_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                         intermediate_size=64), texts)


def test_igpo_and_hcapo_with_the_real_scorer(tiny):
    """The real HFScorer on the tiny policy: IGPO's beliefs and HCAPO's ratios are what a direct
    recomputation with the same model gives (real forward passes, counted as overhead)."""
    from stages.rollout.scorer import HFScorer

    model, tok = tiny
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    trajs = []
    for i, (acts, R) in enumerate([(["search a\n", "answer 7\n"], 1.0), (["calc 3+4\n", "answer 8\n"], 0.0)]):
        resp, mask, turns = [], [], []
        for k, a in enumerate(acts):
            a0 = len(resp)
            resp += ids(a)
            mask += [True] * (len(resp) - a0)
            o0 = len(resp)
            resp += ids("ok\n")
            mask += [False] * (len(resp) - o0)
            turns.append(Turn(index=k, action_span=(a0, o0), obs_span=(o0, len(resp)), action_text=a, observation="ok\n"))
        n = len(resp)
        trajs.append(Trajectory(uid=f"r{i}", group_id=0, task_id="t0", env_name="tooluse", prompt_ids=ids("Q?\n"),
                                response_ids=resp, policy_mask=mask, logprobs=[0.0] * n, entropies=[0.0] * n,
                                turns=turns, reward=R, success=R > 0, privileged={"answer": "7"}))
    batch = Batch(trajs)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    scorer = HFScorer(model, tok.pad_token_id)
    m = build_method(get_method_class("igpo").Config())
    res = m(t, batch, CreditContext(scorer=scorer, tokenizer=tok))
    p, n = m.beliefs(batch, CreditContext(scorer=HFScorer(model, tok.pad_token_id), tokenizer=tok), 2)
    gold = ids("answer 7")
    direct = HFScorer(model, tok.pad_token_id)([trajs[0].prompt_ids + trajs[0].response_ids[:trajs[0].turns[0].obs_span[1]]], [gold])
    assert n == 4 and float(p[0, 1]) == pytest.approx(math.exp(float(direct[0].mean())), rel=1e-4)
    assert res.overhead.extra_forward_passes >= 1 and res.overhead.forward_tokens > 0
    assert res.stats["belief_gain_abs_mean"] > 0  # the tiny policy's belief moves with the history
    h = build_method(get_method_class("hcapo").Config())
    res = h(t, batch, CreditContext(scorer=HFScorer(model, tok.pad_token_id), tokenizer=tok))
    assert res.stats["scored_actions"] == 4 and res.stats["hindsight_ratio_mean"] != pytest.approx(1.0, abs=1e-6)
    assert torch.isfinite(res.advantages).all() and res.overhead.extra_forward_passes >= 1


@pytest.mark.parametrize("name", ["math", "tooluse"])
def test_declared_privileged_keys_are_what_the_environments_carry(name):
    """TaskFamily.privileged_keys (what the loader checks IGPO / CriticSearch against) is exactly the key
    set of a real environment's privileged() (the gold answer included)."""
    import environments.tasks  # noqa: F401  (registers the families)
    from environments.registry import get_family_class

    fam = get_family_class(name)()
    env = fam.make(fam.instance("train", 0, seed=0), sandbox=None)
    env.reset()
    assert set(env.privileged()) == set(fam.privileged_keys) and "answer" in fam.privileged_keys
