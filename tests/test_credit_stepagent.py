"""StepAgent (Deng et al. 2024; survey §5.6): step rewards inferred by inverse RL from expert actions
(the task's optimal agent, or the run's successes), through an implicit reward model fitted by a
step-wise DPO objective (expert action preferred over the agent's at the same state), plus the
novice-to-expert curriculum. Defining properties: after the fit the inferred step reward ranks the
expert's action above a non-expert action at the same state, where the outcomes are equal (so an
implementation that ignores the expert data cannot); the curriculum's expert prefix shrinks as
configured and exempts its steps. Differential against GRPO: no non-expert step or no fit = GRPO
exactly; with the fit the advantage is GRPO's plus alpha times the step reward."""

from __future__ import annotations

import pytest
import torch

from environments.tasks.bifurcation import BifurcationConfig, BifurcationFamily, format_action
from stages.benchmark.oracle import optimal_values, stack_mdps
import stages.credit.methods  # noqa: F401  (registers the methods)
from stages.credit.base import CreditContext
from stages.credit.methods.expert_irl import expert_steps, prefix_length, target_logprobs
from stages.credit.registry import get_method_class
from stages.rollout.policy import sequence_logprobs
from stages.schema import Batch, Trajectory, Turn

CFG = dict(horizon=4, num_decisive=2, num_actions=2)


class CharTokenizer:
    """Test double of a tokenizer: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def _episode(fam, inst, letters, uid, group):
    env = fam.make(inst, episode_seed=0)
    env.reset()
    resp, mask, turns = [], [], []
    for letter in letters:
        key = env.state_key()
        text = format_action(letter)
        s = len(resp)
        resp += [ord(c) for c in text]
        mask += [True] * len(text)
        res = env.step(text)
        e = len(resp)
        resp += [ord(c) for c in res.observation]
        mask += [False] * len(res.observation)
        turns.append(Turn(index=len(turns), action_span=(s, e), obs_span=(e, len(resp)), action_text=text,
                          observation=res.observation, state_key=key, action=res.action))
        if env.done:
            break
    return Trajectory(uid=uid, group_id=group, task_id=inst.task_id, env_name="bifurcation", prompt_ids=[1],
                      response_ids=resp, policy_mask=mask, logprobs=[0.0] * len(resp), entropies=[0.0] * len(resp),
                      turns=turns, reward=float(res.success), success=bool(res.success),
                      ground_truth=env.ground_truth(env.actions))


def _plays(inst, wrong: bool):
    """The expert's letters (the answers at decisive turns, A elsewhere) or, with ``wrong``, the
    other letter at the first decisive turn."""
    answers = {int(t): a for t, a in inst.spec["answers"].items()} if isinstance(inst.spec["answers"], dict) \
        else dict(enumerate(inst.spec["answers"]))
    d0 = min(int(t) for t in inst.spec["decisive"])
    out = []
    for t in range(CFG["horizon"]):
        a = answers.get(t) or "A"
        if wrong and t == d0:
            a = "B" if a == "A" else "A"
        out.append(a)
    return out, d0


@pytest.fixture(scope="module")
def setup():
    from stages.rollout.config import ModelConfig
    from stages.rollout.policy import build_tiny_policy

    torch.manual_seed(0)
    model, _ = build_tiny_policy(ModelConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                             num_kv_heads=1, vocab_size=300), ["A\nB\nok\n"] * 8)
    fam = BifurcationFamily(BifurcationConfig(**CFG))
    trajs, d0s = [], []
    for g, inst in enumerate(fam.instances("train", 2, seed=0)):
        for j, wrong in enumerate([False, True, False, True]):
            letters, d0 = _plays(inst, wrong)
            trajs.append(_episode(fam, inst, letters, f"g{g}-{j}", g))
            d0s.append(d0)
    return model, trajs, d0s


def _tensors(model, trajs, equal_outcome=True):
    import copy

    trajs = copy.deepcopy(trajs)
    if equal_outcome:  # the outcome says nothing: only the expert data can separate the actions
        for t in trajs:
            t.reward, t.success = 0.0, False
    batch = Batch(trajs)
    t = batch.to_tensors()
    with torch.no_grad():  # behaviour log-probs: the policy's own (on-policy rollouts)
        lp, _ = sequence_logprobs(model, t.input_ids, t.attention_mask, t.position_ids, t.prompt_len)
    t.old_logprobs = lp * t.response_mask
    return batch, t


def _method(model, **kw):
    cls = get_method_class("stepagent")
    m = cls(cls.Config(**kw))
    m.bind_policy(model)
    m.build_helpers(16, seed=0)
    return m


CTX = dict(rollout_temperature=1.0, tokenizer=CharTokenizer())


def _grpo(t, batch):
    cls = get_method_class("grpo")
    return cls(cls.Config())(t, batch, CreditContext())


def test_optimal_values_match_the_familys_own_optimal_ground_truth(setup):
    """The expert: the exact MDP's optimal agent; its Q* equals the family's rational DP under its
    optimal reference policy on every played turn (decisive variant)."""
    fam = BifurcationFamily(BifurcationConfig(reference_policy="optimal", **CFG))
    rows = []
    for inst in fam.instances("train", 2, seed=0):
        for wrong in (False, True):
            rows.append(_episode(fam, inst, _plays(inst, wrong)[0], "x", 0))
    mdps = [r.ground_truth.mdp for r in rows]
    V, Q = optimal_values(stack_mdps(mdps), 2)
    for b, (r, m) in enumerate(zip(rows, mdps)):
        for t, turn in enumerate(r.turns):
            s, a = m.states[t], m.actions.index(turn.action)
            assert float(Q[b, t, s, a]) == pytest.approx(r.ground_truth.q_value[t], abs=1e-9)
            assert float(V[b, t, s]) == pytest.approx(r.ground_truth.value[t], abs=1e-9)


def test_the_inferred_step_reward_ranks_the_experts_action_above_the_agents_at_the_same_state(setup):
    model, trajs, d0s = setup
    batch, t = _tensors(model, trajs)
    ex = expert_steps(batch, int(t.num_turns.max()), "auto", CharTokenizer())
    # inspection: exactly the wrong decisive steps are non-expert, each paired with the answer
    want = torch.zeros_like(ex.paired)
    for b, d0 in enumerate(d0s):
        want[b, d0] = b % 2 == 1
    assert torch.equal(ex.paired, want) and ex.source == "optimal"
    assert bool(ex.agrees[~want & (torch.arange(want.shape[1]) < t.num_turns[:, None])].all())
    m = _method(model, rm_steps=6, rm_lr=1e-2, beta=0.5)
    res = m(t, batch, CreditContext(**CTX))
    assert res.stats["pairs"] == 4 and res.stats["rm_loss_after"] < res.stats["rm_loss_before"]
    assert res.stats["rm_accuracy_after"] == 1.0
    # at the same (first decisive) state, the expert's action earns more than the deviation
    for b in range(0, len(trajs), 2):
        assert float(res.credit[b, d0s[b]]) > float(res.credit[b + 1, d0s[b + 1]])
    assert res.stats["expert_step_reward_mean"] > res.stats["nonexpert_step_reward_mean"]
    # and scored directly: the reward model's implicit reward of both letters after the same context
    rm = model.__class__(model.config)
    rm.load_state_dict(res.helper_inputs["rm_state"])
    rm.eval()
    for b in range(1, len(trajs), 2):
        tr = trajs[b]
        ctxt = [tr.prompt_ids + tr.response_ids[:tr.turns[d0s[b]].action_span[0]]] * 2
        expert = "A" if tr.turns[d0s[b]].action == "B" else "B"
        cand = [[ord(c) for c in format_action(expert)], [ord(c) for c in format_action(tr.turns[d0s[b]].action)]]
        with torch.no_grad():
            r = target_logprobs(rm, ctxt, cand, 1.0) - target_logprobs(model, ctxt, cand, 1.0)
        assert float(r[0]) > float(r[1])
    # an implementation ignoring the expert data has nothing to separate them by: equal outcomes
    assert float(res.advantages.abs().max()) > 0 and float(_grpo(t, batch).advantages.abs().max()) == 0.0


def test_the_rankings_follow_the_expert_not_the_letters(setup):
    """Relabel the expert (successes source, the wrong-letter rows declared the successes): the
    inferred reward flips, so it comes from the expert data, not from the letters themselves."""
    model, trajs, d0s = setup
    batch, t = _tensors(model, trajs)
    for b, tr in enumerate(batch.trajectories):
        tr.ground_truth = None
        tr.success = b % 2 == 1
    res = _method(model, expert="successes", rm_steps=6, rm_lr=1e-2, beta=0.5)(t, batch, CreditContext(**CTX))
    assert res.stats["pairs"] == 4  # the expert-letter rows deviate from the "successes" at their decisive state
    for b in range(0, len(trajs), 2):
        assert float(res.credit[b, d0s[b]]) < float(res.credit[b + 1, d0s[b + 1]])


def test_the_curriculum_prefix_shrinks_as_configured_and_exempts_its_steps(setup):
    assert [prefix_length(i, 4, 4) for i in range(6)] == [4, 3, 2, 1, 0, 0]
    assert [prefix_length(i, 3, 6) for i in range(7)] == [3, 3, 2, 2, 1, 1, 0]
    assert prefix_length(0, 0, 5) == 0
    model, trajs, d0s = setup
    batch, t = _tensors(model, trajs)
    g = _grpo(t, batch)
    covered = []
    for it in range(5):
        batch.iteration = it
        res = _method(model, rm_steps=2, rm_lr=1e-2, beta=0.5, curriculum_start=4, curriculum_iterations=4)(
            t, batch, CreditContext(**CTX))
        L = int(res.stats["prefix_length"])
        assert L == prefix_length(it, 4, 4)
        assert float(res.credit[:, :L].abs().sum()) == 0.0  # the prefix's steps: no IRL reward
        covered.append(int((res.credit != 0).sum()))
        # pairs only beyond the prefix (the non-expert steps sit at the first decisive turn)
        assert res.stats["pairs"] == (4 if L <= min(d0s) else 0)
        if L >= CFG["horizon"]:
            assert torch.allclose(res.advantages, g.advantages, atol=1e-6)
    assert covered == sorted(covered) and covered[-1] > covered[0]  # the agent is held to more steps over time


def test_without_a_deviation_or_a_fit_it_is_grpo_and_with_one_it_adds_the_step_term(setup):
    model, trajs, _ = setup
    batch, t = _tensors(model, trajs, equal_outcome=False)
    g = _grpo(t, batch)
    res0 = _method(model, rm_steps=0)(t, batch, CreditContext(**CTX))
    assert torch.allclose(res0.advantages, g.advantages, atol=1e-5)  # pi_phi = pi_ref: every step reward 0
    experts = Batch([tr for b, tr in enumerate(trajs) if b % 2 == 0])
    te = _tensors(model, experts.trajectories, equal_outcome=False)[1]
    rese = _method(model, rm_steps=4, rm_lr=1e-2)(te, experts, CreditContext(**CTX))
    assert rese.stats["pairs"] == 0 and rese.stats["expert_agreement"] == 1.0
    assert torch.allclose(rese.advantages, _grpo(te, experts).advantages, atol=1e-5)
    res = _method(model, rm_steps=4, rm_lr=1e-2, beta=0.5, alpha=0.5)(t, batch, CreditContext(**CTX))
    mask = t.response_mask
    step = torch.nan_to_num(res.credit).gather(1, t.turn_ids.clamp(min=0)) * mask
    assert torch.allclose(res.advantages, (g.advantages + 0.5 * step) * mask, atol=1e-5)
    assert not torch.allclose(res.advantages, g.advantages, atol=1e-4)
    assert res.overhead.extra_forward_passes > 0 and res.overhead.forward_tokens > 0


def test_the_reward_model_is_a_helper_adopted_by_the_update_stage(setup):
    model, trajs, _ = setup
    batch, t = _tensors(model, trajs)
    m = _method(model, rm_steps=2, rm_lr=1e-2)
    assert set(m.helper_modules()) == {"stepagent_rm"}
    res = m(t, batch, CreditContext(**CTX))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m.rm.state_dict().values()))
    assert m.update_helpers(res, seed=0) == {"rm_adopted": 1.0}
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m.rm.state_dict().values()))


def test_config_rules_are_one_line_errors():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^credit.expert=optimal: needs the family's scripted optimal agent") as e:
        load_config(["env=math", "credit=stepagent", "credit.expert=optimal"])
    assert "\n" not in str(e.value)
    load_config(["env=math", "credit=stepagent", "credit.expert=successes"])
    load_config(["env=bifurcation", "credit=stepagent", "credit.expert=optimal"])
    with pytest.raises(ConfigError, match=r"credit.expert"):
        load_config(["env=bifurcation", "credit=stepagent", "credit.expert=teacher"])
    with pytest.raises(ConfigError, match=r"credit.beta"):
        load_config(["env=bifurcation", "credit=stepagent", "credit.beta=0"])
