"""Differential tests (issue 13): each method against GRPO on a batch where the method's defining
signal is present. Every test computes GRPO's advantages on the same batch and asserts where the
method must differ from them (sign, magnitude, exact zeros) and where it must agree, so a method
that silently degenerates to GRPO fails its test.

Methods here: the episode-level baselines (RLOO, REINFORCE++, REINFORCE++-baseline, PPO's GAE,
ReMax), the MC methods (VinePPO, SPO), TEMPO and SCAR.

* VinePPO and SPO run on the real bifurcation environment (survey §9.3): the MC provider below
  forks the real :class:`~environments.tasks.bifurcation_env.BifurcationEnv` (replay of the recorded
  turns, then continuations) with a uniform policy over the valid letters, which is the
  environment's ``reference_policy="uniform"``, so its exact ground-truth advantages
  (``env.ground_truth``) are the advantages these estimators converge to.
* SCAR runs both with the real scorer (:class:`~stages.reward.judge.HFScorer` on the tiny Qwen2
  policy: Shapley efficiency and symmetry hold for any game) and with a set-function scorer whose
  game is known (a decisive step, a null step).
* GAE's critic and ReMax's greedy returns are hand-written test doubles (the tests are about the
  estimators; the real providers run in tests/test_methods_flow.py and tests/test_remax.py).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers every built-in method)
from environments.tasks.bifurcation import BifurcationConfig, BifurcationFamily, format_action
from tests.test_credit_tempo import _tensors as tempo_tensors
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.schema import Batch, BatchTensors, Overhead, Trajectory, Turn, turn_credit


def _run(name: str, t: BatchTensors, batch=None, ctx: CreditContext | None = None, **cfg):
    method = build_method(get_method_class(name).Config(**cfg))
    return method(t, batch if batch is not None else Batch([]), ctx or CreditContext())


def _grpo(t: BatchTensors, batch=None, **cfg) -> torch.Tensor:
    """GRPO's (B, R) advantages on the same batch (the registry method, not the functional)."""
    return _run("grpo", t, batch, **cfg).advantages


def _tensors(rewards: torch.Tensor, mask: torch.Tensor, index) -> BatchTensors:
    """BatchTensors of given (B, R) token rewards and policy mask (one turn per row)."""
    B, R = rewards.shape
    P = 2
    ids = (torch.arange(B * (P + R)).view(B, P + R) % 50) + 1
    attn = torch.ones(B, P + R, dtype=torch.long)
    turn_ids = torch.where(mask.bool(), torch.zeros(B, R, dtype=torch.long), torch.full((B, R), -1))
    return BatchTensors(
        input_ids=ids, attention_mask=attn, position_ids=attn.cumsum(-1) - 1, prompt_len=P,
        response_ids=ids[:, P:], response_mask=mask.float(), old_logprobs=torch.zeros(B, R),
        entropies=torch.zeros(B, R), token_level_rewards=rewards.double(), episode_rewards=rewards.sum(-1).double(),
        index=torch.as_tensor(index, dtype=torch.long), turn_ids=turn_ids, num_turns=torch.ones(B, dtype=torch.long))


def _terminal(scores, lengths, R=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, mask) with each row's score on its last policy token."""
    R = R or max(lengths)
    B = len(scores)
    rew = torch.zeros(B, R, dtype=torch.float64)
    mask = torch.zeros(B, R)
    for i, (s, n) in enumerate(zip(scores, lengths)):
        mask[i, :n] = 1
        rew[i, n - 1] = s
    return rew, mask


# ============================================================================ episode baselines


def test_rloo_is_the_leave_one_out_mean_not_grpo():
    """RLOO (Ahmadian et al. 2024): ``A_i = R_i - mean_{j!=i} R_j = n/(n-1) (R_i - mean)``: no
    division by the group std, so it scales with the rewards, unlike GRPO."""
    scores = [1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 1.0, 0.5, 0.5, 0.5]
    index = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    rew, mask = _terminal(scores, [3] * 10)
    t = _tensors(rew, mask, index)
    res, grpo = _run("rloo", t), _grpo(t)
    s = torch.tensor(scores, dtype=torch.float64)
    loo = torch.stack([s[i] - s[[j for j in range(10) if index[j] == index[i] and j != i]].mean() for i in range(10)])
    assert torch.allclose(res.advantages[:, 0].double(), loo)  # defining property
    # differs: group 0 (n=4): RLOO of the success is 1 - 0 = 1; GRPO's is (1 - 0.25) / std = 1.5
    assert res.advantages[0, 0] == pytest.approx(1.0) and grpo[0, 0] == pytest.approx(1.5, rel=1e-4)
    # the ratio to GRPO is n/(n-1) * std_g per group: not one constant (GRPO rescaled would be)
    ratio = res.advantages[[0, 4], 0] / grpo[[0, 4], 0]
    assert abs(float(ratio[0] - ratio[1])) > 0.1
    # differs: scaling the rewards scales RLOO, leaves GRPO unchanged
    t10 = _tensors(rew * 10, mask, index)
    assert torch.allclose(_run("rloo", t10).advantages, 10 * res.advantages)
    assert torch.allclose(_grpo(t10), grpo, atol=1e-5)
    # agrees: the same sign on every token, zero on the flat group and off the mask
    assert torch.equal(torch.sign(res.advantages), torch.sign(grpo))
    assert torch.all(res.advantages[7:] == 0) and torch.all(grpo[7:] == 0)
    assert torch.all(res.advantages[mask == 0] == 0)


def test_reinforce_pp_whitens_over_the_batch_not_per_group():
    """REINFORCE++ (Hu 2025): the return-to-go whitened over all policy tokens of the batch, no
    group baseline: two flat groups (all success / all failure) get +/- advantages where GRPO
    gives 0; a turn reward makes the tokens before it differ from those after it."""
    scores = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    index = [0, 0, 1, 1, 2, 2]
    rew, mask = _terminal(scores, [4] * 6)
    t = _tensors(rew, mask, index)
    res, grpo = _run("reinforce_pp", t), _grpo(t)
    a = res.advantages
    m = mask.bool()
    assert float(a[m].mean()) == pytest.approx(0.0, abs=1e-6) and float(a[m].std()) == pytest.approx(1.0, abs=1e-4)
    # differs: flat groups 0 and 1 have GRPO advantage 0 and REINFORCE++ advantage +/-1
    assert torch.all(grpo[:4] == 0)
    assert torch.all(a[:2][m[:2]] > 0.9) and torch.all(a[2:4][m[2:4]] < -0.9)
    # agrees: within the mixed group the success is above the failure, as in GRPO; with equal
    # lengths and terminal rewards the advantage is constant along each response, like GRPO's
    assert float(a[4, 0]) > 0 > float(a[5, 0]) and float(grpo[4, 0]) > 0 > float(grpo[5, 0])
    assert torch.allclose(a[m].view(6, 4), a[:, :1].expand(6, 4))
    # differs: a turn reward on token 1 of row 4 raises tokens 0-1 only (return-to-go); GRPO stays flat
    rew2 = rew.clone()
    rew2[4, 1] = 0.5
    t2 = _tensors(rew2, mask, index)
    a2, g2 = _run("reinforce_pp", t2).advantages, _grpo(t2)
    assert float(a2[4, 0] - a2[4, 2]) > 0.5 and torch.allclose(a2[4, 0], a2[4, 1])
    assert torch.allclose(g2[4, :4], g2[4, :1].expand(4))


def test_reinforce_pp_baseline_centres_per_group_but_scales_per_batch():
    """REINFORCE++-baseline (Hu 2025): ``R - mean_g`` per group, then whitened over the batch's
    tokens: a group with a 10x smaller spread keeps 10x smaller advantages (GRPO's per-group std
    makes both groups' advantages equal)."""
    scores = [1.0, 0.0, 1.0, 0.0, 0.1, 0.0, 0.1, 0.0, 0.5, 0.5]
    index = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    rew, mask = _terminal(scores, [3] * 10)
    t = _tensors(rew, mask, index)
    res, grpo = _run("reinforce_pp_baseline", t), _grpo(t)
    a = res.advantages[:, 0]
    # differs: GRPO gives groups 0 and 1 the same magnitude, REINFORCE++-baseline a 10x ratio
    assert grpo[0, 0] == pytest.approx(float(grpo[4, 0]), rel=1e-4)
    assert float(a[0] / a[4]) == pytest.approx(10.0, rel=1e-4)
    # the scale is the batch's: unit variance over all policy tokens
    m = mask.bool()
    assert float(res.advantages[m].std()) == pytest.approx(1.0, abs=1e-4)
    # agrees: signs, zeros on the flat group, constant along each response
    assert torch.equal(torch.sign(res.advantages[:8]), torch.sign(grpo[:8]))
    assert torch.allclose(res.advantages[8:], torch.zeros_like(res.advantages[8:]), atol=1e-6)


def _gae_batch():
    """One group: rows 0, 1 succeed, rows 2, 3 fail; two turns of two policy tokens and an
    observation token between them. The outcome is decided at turn 0's last token."""
    B, R = 4, 5
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]] * B)
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    rew = torch.zeros(B, R, dtype=torch.float64)
    rew[:, 4] = scores
    t = _tensors(rew, mask, [0, 0, 0, 0])
    turn = torch.tensor([0, 0, -1, 1, 1])
    t.turn_ids = torch.where(mask.bool(), turn.expand(B, R), torch.full((B, R), -1))
    # a critic that has learnt the task: V = 0.5 before the decision, the outcome after it
    values = torch.zeros(B, R, dtype=torch.float64)
    values[:, :2] = 0.5
    values[:, 3:] = scores.unsqueeze(1)
    return t, values, scores


class _Critic:
    def __init__(self, values):
        self.v = values

    def values(self, tensors):
        return self.v


def test_gae_credit_follows_the_critic_and_lambda():
    """PPO/GAE (Schulman et al. 2016): per-token TD credit from the critic's values. With a critic
    that knows the outcome after the decisive token, ``lam=0`` puts all credit on that token (the
    routine turn after it gets exactly 0), ``lam=1`` on the whole decisive turn; GRPO spreads the
    same advantage over every token."""
    t, values, scores = _gae_batch()
    grpo = _grpo(t)
    pol = t.response_mask.bool()
    td = _run("gae", t, ctx=CreditContext(critic=_Critic(values)), gamma=1.0, lam=0.0).advantages
    mc = _run("gae", t, ctx=CreditContext(critic=_Critic(values)), gamma=1.0, lam=1.0).advantages
    # differs: lam=0 -- only token 1 (whose next state reveals the outcome) carries credit
    assert torch.all(td[:, [0, 3, 4]].abs() < 1e-6) and torch.all(td[:, 1].abs() > 0.5)
    # lam=1 -- both tokens of the decisive turn carry G - V = +/-0.5 (whitened), the routine turn 0
    assert torch.all(mc[:, [3, 4]].abs() < 1e-6) and torch.allclose(mc[:, 0], mc[:, 1])
    assert not torch.allclose(td, mc)
    assert torch.all(grpo[pol].abs() > 0.5)  # GRPO: every token of every row
    # differs: a critic that predicts the outcome from the start leaves nothing to credit
    oracle = scores.unsqueeze(1).expand(4, 5).clone()
    none = _run("gae", t, ctx=CreditContext(critic=_Critic(oracle)), gamma=1.0, lam=0.95).advantages
    assert torch.all(none.abs() < 1e-6)
    # agrees: where GAE gives credit its sign is GRPO's (successes up, failures down)
    assert torch.equal(torch.sign(td[:, 1]), torch.sign(grpo[:, 1]))
    # agrees: with a zero critic and lam=1 it is the whitened return on every token, GRPO's
    # direction, constant along each response
    zero = _run("gae", t, ctx=CreditContext(critic=_Critic(torch.zeros_like(values))), gamma=1.0, lam=1.0).advantages
    ratio = zero[pol] / grpo[pol]
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=1e-5) and float(ratio[0]) > 0


def test_remax_baseline_is_the_greedy_return():
    """ReMax (Li et al. 2023): ``A = R - R(greedy rollout of the task)``. A group that all fails
    while its greedy rollout succeeds is pushed down (GRPO: 0); the advantage gaps inside a group
    are raw reward gaps (no std)."""
    scores = [0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    index = [0, 0, 0, 1, 1, 1, 2, 2]
    greedy_by_group = {0: 1.0, 1: 1.0, 2: 1.0}
    rew, mask = _terminal(scores, [2] * 8)
    t = _tensors(rew, mask, index)
    calls = []

    def greedy(batch):  # test double of the greedy-rollout provider: one greedy return per task
        calls.append(batch)
        return torch.tensor([greedy_by_group[g] for g in index], dtype=torch.float64), Overhead(env_resets=3)

    res = _run("remax", t, ctx=CreditContext(greedy_rollout=greedy))
    grpo = _grpo(t)
    a = res.advantages[:, 0].double()
    s = torch.tensor(scores, dtype=torch.float64)
    assert torch.allclose(a, s - 1.0)  # defining property
    assert len(calls) == 1 and res.overhead.env_resets == 3
    # differs: group 0 failed everywhere, the greedy rollout succeeded: -1 each; GRPO 0
    assert torch.all(grpo[:3] == 0) and torch.all(a[:3] == -1.0)
    # differs: group 1's success gets 0 (it only matches greedy), GRPO's gets a positive advantage
    assert a[3] == 0.0 and float(grpo[3, 0]) > 0.5
    # agrees: the order within a group (gaps are reward gaps), and zero where the group and greedy agree
    assert torch.allclose(a[3] - a[4], s[3] - s[4]) and float(grpo[3, 0] - grpo[4, 0]) > 0
    assert torch.all(a[6:] == 0) and torch.all(grpo[6:] == 0)


# ============================================================================ bifurcation MC

BIF = BifurcationConfig(horizon=6, num_decisive=2, num_actions=2, slip_prob=0.0)
LETTER_TOKEN = {"A": 40, "B": 41}
NL = 3  # the newline that ends a turn
PROB_DECISIVE, PROB_ROUTINE = 0.5, 0.95  # behaviour probabilities of the letters (SPO's cut points)


def _bif_episode(fam, inst, actions, uid, gid, ep_seed) -> Trajectory:
    """Play ``actions`` (letters) on the real environment; tokens: letter + newline per turn
    (policy), one observation token (the next cue's index) after each turn."""
    env = fam.make(inst, episode_seed=ep_seed)
    env.reset()
    ids, pm, lps, turns = [], [], [], []
    terminal = 0.0
    for k, a in enumerate(actions):
        key = env.state_key()  # the state the action is taken in (GiGPO's anchor)
        res = env.step(format_action(a))
        s = len(ids)
        p = PROB_DECISIVE if env.decisive[k] else PROB_ROUTINE
        ids += [LETTER_TOKEN[a], NL, 10 + k]
        pm += [True, True, False]
        lps += [math.log(p), 0.0, 0.0]
        turns.append(Turn(index=k, action_span=(s, s + 2), obs_span=(s + 2, s + 3), action_text=format_action(a),
                          observation=res.observation, reward=float(res.info["turn_reward"]), action=res.action,
                          state_key=key))
        terminal = float(res.info.get("terminal_reward", 0.0))
    return Trajectory(uid=uid, group_id=gid, task_id=inst.task_id, env_name="bifurcation", prompt_ids=[1, 2],
                      response_ids=ids, policy_mask=pm, logprobs=lps, entropies=[0.0] * len(ids), turns=turns,
                      reward=terminal, success=terminal > 0, ground_truth=env.ground_truth(list(actions)),
                      meta={"instance": inst, "episode_seed": ep_seed, "actions": list(actions)})


def bifurcation_batch(n_instances=3, seed=0) -> Batch:
    """Per instance a group of 4 episodes: both decisive turns right (twice, different routine
    letters), the first one wrong, the second one wrong. Routine letters are random."""
    fam = BifurcationFamily(BIF)
    rng = random.Random(seed)
    trajs = []
    for g, inst in enumerate(fam.instances("train", n_instances, seed=seed)):
        ans = inst.spec["answers"]
        d1, d2 = inst.spec["decisive"]
        wrong = {"A": "B", "B": "A"}
        for e, flip in enumerate([(), (), (d1,), (d2,)]):
            acts = [ans[t] if ans[t] is not None else rng.choice("AB") for t in range(BIF.horizon)]
            for t in flip:
                acts[t] = wrong[acts[t]]
            trajs.append(_bif_episode(fam, inst, acts, f"g{g}e{e}", g, ep_seed=e))
    return Batch(trajs)


class BifurcationMC:
    """MC continuations on the real bifurcation environment (the ``MCRollouts`` protocol): a fresh
    environment of the trajectory's instance and episode seed is replayed to the start's turn,
    snapshotted, and ``k`` continuations of the uniform policy over the valid letters (the
    environment's reference policy) finish the episode from it."""

    def __init__(self, batch: Batch, seed: int = 0):
        self.batch, self.fam = batch, BifurcationFamily(BIF)
        self.rng = random.Random(seed)
        self.requests: list[tuple[list[tuple[int, int]], int]] = []

    def __call__(self, starts, k, replacements=None):
        self.requests.append((list(starts), k))
        out = torch.zeros(len(starts), k, dtype=torch.float64)
        oh = Overhead()
        for i, (row, pos) in enumerate(starts):
            traj = self.batch.trajectories[row]
            turn = next((u.index for u in traj.turns if u.action_span[0] == pos), None)
            if turn is None:
                assert pos >= traj.turns[-1].action_span[1], f"start {pos} is not a turn's action start"
                continue  # past the last action: nothing more is collected
            env = self.fam.make(traj.meta["instance"], episode_seed=traj.meta["episode_seed"])
            env.reset()
            for a in traj.meta["actions"][:turn]:
                env.step(format_action(a))
            snap = env.snapshot()
            for j in range(k):
                env.restore(snap, reseed=j)
                total = 0.0
                while not env.done:
                    total += env.step(format_action(self.rng.choice(env.letters))).reward
                    oh.env_steps += 1
                out[i, j] = total
            oh.env_resets += k
            oh.extra_tokens += 2 * k * (BIF.horizon - turn)
        return out, oh


def _turn_adv(adv: torch.Tensor, t: BatchTensors) -> torch.Tensor:
    """(B, H) mean advantage over each turn's policy tokens (what the update gets per turn)."""
    return turn_credit(adv, t.turn_ids, t.max_turns).double()


def _masks(t: BatchTensors):
    """(decisive, routine-on-track, off-track) (B, H) masks and the exact advantages."""
    exact = t.gt_turn_advantage.double()
    decisive = t.decisive
    off = torch.zeros_like(decisive)
    # off track: after a wrong decisive action (exact advantage < 0) every later turn
    wrong = decisive & (exact < 0)
    off[:, 1:] = wrong.long().cumsum(-1)[:, :-1].bool()
    routine_on = ~decisive & ~off
    return decisive, routine_on, off, exact


@pytest.fixture(scope="module")
def bif():
    batch = bifurcation_batch()
    return batch, batch.to_tensors()


def test_vineppo_routine_turns_vanish_as_k_grows_decisive_keep_the_exact_sign(bif):
    """VinePPO (Kazemnejad et al. 2025, §3.1.1): per-turn MC advantage from forked rollouts. On the
    bifurcation task routine turns' advantages go to 0 as k grows, decisive ones keep the sign of
    the exact advantage, turns after the episode went off track get exactly 0; GRPO gives every
    turn the episode's advantage."""
    batch, t = bif
    decisive, routine, off, exact = _masks(t)
    grpo = _turn_adv(_grpo(t, batch), t)
    mc = BifurcationMC(batch, seed=1)
    small = _turn_adv(_run("vineppo", t, batch, CreditContext(mc_rollouts=BifurcationMC(batch, seed=2)), k=2).advantages, t)
    res = _run("vineppo", t, batch, CreditContext(mc_rollouts=mc), k=512)
    vine = _turn_adv(res.advantages, t)
    # differs: routine turns -> 0 as k grows; GRPO gives them the episode's (large) advantage
    assert float(vine[routine].abs().max()) < 0.15
    assert float(vine[routine].abs().mean()) < float(small[routine].abs().mean()) / 4
    assert float(grpo[routine].abs().min()) > 0.5
    # differs: off track nothing can change the outcome: exactly 0 (GRPO: the failure's negative)
    assert torch.all(vine[off] == 0) and torch.all(grpo[off] < -0.5)
    # decisive turns: the exact advantage's sign, and close to it
    live = decisive & (exact != 0)
    assert torch.equal(torch.sign(vine[live]), torch.sign(exact[live]))
    assert float((vine[live] - exact[live]).abs().max()) < 0.15
    # differs in sign where GRPO is wrong: the first decisive turn, played right, of an episode
    # that later failed gets GRPO's negative advantage and VinePPO's positive one
    first_right_then_fail = decisive & (exact > 0) & (grpo < 0)
    assert first_right_then_fail.any()
    assert torch.all(vine[first_right_then_fail] > 0)
    # agrees: per episode the turn advantages telescope to R - V(s_0), with GRPO's sign
    total = torch.nansum(vine, -1)
    assert torch.equal(torch.sign(total), torch.sign(grpo[:, 0]))
    # k continuations per turn start, billed as the provider's overhead
    assert mc.requests[0][1] == 512 and len(mc.requests[0][0]) == t.num_turns.sum()
    assert res.stats["mc_continuations"] == 512 * float(t.num_turns.sum())
    assert res.overhead.env_resets == 512 * int(t.num_turns.sum())


@pytest.mark.parametrize("variant", ["chain", "tree"])
def test_spo_puts_segment_credit_on_the_low_probability_cut_points(bif, variant):
    """SPO (Guo et al. 2025, §3.2): segments cut at low-probability tokens (here the decisive
    letters, probability 0.5; routine letters have 0.95), MC segment values, and with the
    probability mask the segment advantage goes to the cut-point tokens only: every routine token
    gets exactly 0, decisive letters the sign of the exact advantage of their turn; GRPO credits
    every token. ``tree`` (SPO-tree's subtree-mean values) keeps the signs, shrunk by ~k/(k+1)."""
    batch, t = bif
    decisive, routine, off, exact = _masks(t)
    grpo = _grpo(t, batch)
    mc = BifurcationMC(batch, seed=3)
    k = 256
    res = _run("spo", t, batch, CreditContext(mc_rollouts=mc), k=k, variant=variant, cutpoint_threshold=0.9)
    adv = res.advantages.double()
    cut = t.old_logprobs < math.log(0.9)  # the decisive letters
    # differs: only the cut points carry credit; GRPO credits every policy token
    pol = t.response_mask.bool()
    assert torch.all(adv[pol & ~cut] == 0)
    assert float(grpo[pol & ~cut].abs().min()) > 0.5
    # decisive letters = cut points; their credit has the exact advantage's sign
    turn_adv = _turn_adv(res.advantages * 2, t)  # a turn = letter + newline: the letter's value
    live = decisive & (exact != 0)
    assert torch.equal(torch.sign(turn_adv[live]), torch.sign(exact[live]))
    scale = k / (k + 1) if variant == "tree" else 1.0
    assert float((turn_adv[live] - scale * exact[live]).abs().max()) < 0.15
    assert torch.all(turn_adv[routine | off] == 0)
    # agrees: the segment advantages telescope to R - V(s_0), with GRPO's sign
    total = adv.sum(-1)
    assert torch.equal(torch.sign(total), torch.sign(grpo[:, 0].double()))
    # two segments per episode (one per decisive turn): 2 MC points per row, k continuations each
    assert res.stats["mc_points"] == 2 * len(batch) and res.stats["mc_continuations"] == 2 * len(batch) * k
    assert len(mc.requests[0][0]) == 2 * len(batch)


# ============================================================================ TEMPO


def test_tempo_corrects_grpo_only_at_branch_tokens():
    """TEMPO (Tran et al. 2025, §3.2): GRPO plus ``V(child) - V(node)`` at branching nodes of the
    group's prefix tree. A decisive branch (token 7 -> success, 8 -> failure) after a shared
    prefix: the branch tokens move by the value gap (up for 7, down for 8), a routine branch whose
    children have the same outcome (9 / 10) and every non-branch token keep GRPO's advantage."""
    responses = [[5, 6, 7, 9, 4], [5, 6, 7, 10, 4], [5, 6, 8, 9, 4], [5, 6, 8, 9, 4, 4]]
    scores = [1.0, 1.0, 0.0, 0.0]
    t = tempo_tensors(responses, scores, [0, 0, 0, 0])
    res, grpo = _run("tempo", t), _grpo(t)
    a = res.advantages.double()
    g = grpo.double()
    z = g[:, 0]
    diff = a - g
    # differs at the decisive branch (position 2): V(567) - V(56) = z_success - mean z = z_success
    assert torch.allclose(diff[:2, 2], z[:2]) and torch.all(diff[:2, 2] > 0.5)
    assert torch.allclose(diff[2:, 2], z[2:]) and torch.all(diff[2:, 2] < -0.5)
    # the rows through the same child get the same correction (shared subtree value)
    assert torch.isclose(diff[0, 2], diff[1, 2]) and torch.isclose(diff[2, 2], diff[3, 2])
    # ... and the end-vs-continue branch of rows 2/3 (same outcome) adds nothing
    # agrees: shared prefix (positions 0-1), the routine branch 9/10 of two successes and every
    # other non-branch token: exactly GRPO
    keep = torch.ones_like(a, dtype=torch.bool)
    keep[:, 2] = False
    pol = t.response_mask.bool()
    assert torch.allclose(a[keep & pol], g[keep & pol])
    assert res.stats["branch_nodes"] >= 2 and res.overhead.extra_forward_passes == 0


# ============================================================================ SCAR

ANSWER = [90, 91]


class SetScorer:
    """``log p(answer | kept steps)`` = sum of the weights of the markers present - 3 (a known game)."""

    def __init__(self, weights):
        self.weights = weights
        self.forward_passes = 0

    def value(self, present):
        return sum(w for m, w in self.weights.items() if m in present) - 3.0

    def __call__(self, contexts, targets):
        self.forward_passes += len(contexts)
        return [torch.full((len(tg),), self.value(set(c)) / len(tg)) for c, tg in zip(contexts, targets)]


def _steps_traj(steps, reward, uid, group, answer=ANSWER) -> Trajectory:
    ids, pm, turns = [], [], []
    for k, act in enumerate(list(steps) + [list(answer)]):
        s = len(ids)
        ids += list(act) + [3]
        pm += [True] * len(act) + [False]
        turns.append(Turn(index=k, action_span=(s, s + len(act)), obs_span=(s + len(act), s + len(act) + 1),
                          action_text="", observation="o"))
    n = len(ids)
    return Trajectory(uid=uid, group_id=group, task_id="t", env_name="toy", prompt_ids=[1, 2], response_ids=ids,
                      policy_mask=pm, logprobs=[0.0] * n, entropies=[0.0] * n, turns=turns, reward=reward)


def _step_adv(res, t, n_steps):
    return _turn_adv(res.advantages, t)[:, :n_steps]


def test_scar_credits_the_step_that_supports_the_answer():
    """SCAR (Cao et al. 2025, §3.2): the outcome is distributed over the reasoning steps by their
    Shapley values in ``v(S) = log p(answer | S)``. A decisive step (weight 2) gets the larger
    share, two symmetric steps equal shares, a null step exactly the zero-reward share; the
    answer step and failed episodes keep GRPO's advantage, and the mean over the reasoning steps
    is GRPO's (the shaped rewards sum to the outcome)."""
    scorer = SetScorer({20: 2.0, 21: 0.5, 22: 0.5, 23: 0.0})
    batch = Batch([_steps_traj([[20, 5], [21, 5], [22, 5], [23, 5]], 1.0, "win", 0),
                   _steps_traj([[23, 5], [20, 5], [21, 5], [22, 5]], 1.0, "win2", 0),
                   _steps_traj([[20, 5], [21, 5], [22, 5], [23, 5]], 0.0, "fail", 0),
                   _steps_traj([[23, 5], [23, 5], [21, 5], [22, 5]], 0.0, "fail2", 0)])
    t = batch.to_tensors()
    res = _run("scar", t, batch, CreditContext(scorer=scorer))
    grpo = _turn_adv(_grpo(t, batch), t)
    a = _step_adv(res, t, 5)
    # differs: the decisive step above GRPO, the null step below it; symmetric steps equal
    z = grpo[0, 0]
    assert a[0, 0] > z + 1.0 and a[0, 3] < z - 1.0
    assert torch.isclose(a[0, 1], a[0, 2])
    # the credit follows the step, not its position
    assert torch.isclose(a[1, 1], a[0, 0]) and torch.isclose(a[1, 0], a[0, 3])
    # the null step's shaped reward is 0: advantage (0 - mean) / std
    mean, std = 0.5, float(torch.tensor([1.0, 1.0, 0.0, 0.0]).std())
    assert float(a[0, 3]) == pytest.approx(-mean / (std + 1e-6), rel=1e-5)
    # agrees: the answer step = GRPO, the reasoning steps average to GRPO, failures are GRPO
    assert torch.allclose(a[:, 4], grpo[:, 4], atol=1e-6)
    assert torch.allclose(a[:, :4].mean(-1), grpo[:, 0], atol=1e-6)
    assert torch.allclose(a[2:], grpo[2:, :5], atol=1e-6)
    phi = res.credit[:, :4].double()
    # Shapley values of the additive game are the weights (efficiency: sum = v(all) - v(empty) = 3)
    assert torch.allclose(phi[0], torch.tensor([2.0, 0.5, 0.5, 0.0], dtype=torch.float64))
    assert torch.isclose(phi[0].sum(), torch.tensor(3.0, dtype=torch.float64))
    assert res.stats["fallback_failed"] == 2 and res.stats["fallback_rows"] == 2
    assert res.overhead.extra_forward_passes == 4 * 2**4


@pytest.fixture(scope="module")
def tiny():
    from stages.rollout.config import ModelConfig
    from stages.rollout.policy import build_tiny_policy

    torch.set_num_threads(1)
    texts = ["3+4*2\n4*2=8\n3+8=11\nanswer 11\n", "5+1\n5+1=6\nanswer 6\n", "9-2\n9-2=7\nanswer 7\n"]
    model, tok = build_tiny_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                               intermediate_size=64), texts * 8)
    # a few language-model steps on the worked solutions, so that the reasoning lines support the
    # answer line they lead to (an untrained policy's game is ~0 everywhere)
    ids = [torch.tensor([tok(x, add_special_tokens=False)["input_ids"]]) for x in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.train()
        for step in range(40):
            x = ids[step % len(ids)]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, tok


def test_scar_with_the_real_policy_scorer_is_efficient_and_symmetric(tiny):
    """SCAR with the real scorer (HFScorer on the tiny Qwen2 policy): for any game the Shapley
    values sum to ``v(all) - v(empty)`` (checked against direct forward passes) and two adjacent
    identical steps are symmetric players; the advantages of the reasoning steps average to
    GRPO's and differ from it in proportion to the Shapley shares."""
    from stages.rollout.scorer import HFScorer

    model, tok = tiny
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    episodes = [(["4*2=8\n", "4*2=8\n", "3+8=11\n"], 1.0), (["3+4=7\n", "7*2=14\n", "9-2=7\n"], 0.0),
                (["4*2=8\n", "3+8=11\n", "3+8=11\n"], 1.0), (["9-2=7\n", "7*2=14\n", "3+8=11\n"], 0.0)]
    trajs = []
    for i, (steps, r) in enumerate(episodes):
        ids, turns = [], []
        for k, s in enumerate(steps + ["answer 11\n"]):
            a = len(ids)
            ids += enc(s)
            turns.append(Turn(index=k, action_span=(a, len(ids)), obs_span=(len(ids), len(ids)), action_text=s,
                              observation=""))
        trajs.append(Trajectory(uid=f"s{i}", group_id=0, task_id="t", env_name="math", prompt_ids=enc("3+4*2\n"),
                                response_ids=ids, policy_mask=[True] * len(ids), logprobs=[0.0] * len(ids),
                                entropies=[0.0] * len(ids), turns=turns, reward=r))
    batch = Batch(trajs)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    scorer = HFScorer(model, pad_token_id=tok.pad_token_id, batch_size=8)
    res = _run("scar", t, batch, CreditContext(scorer=scorer))
    grpo = _turn_adv(_grpo(t, batch), t)
    a = _step_adv(res, t, 4)
    # differs: the successes' reasoning steps get unequal credit (GRPO: the same on each)
    assert float((a[[0, 2], :3] - grpo[[0, 2], :1]).abs().max()) > 0.1
    # agrees: the answer step and the mean over reasoning steps are GRPO's; failures are GRPO
    assert torch.allclose(a[:, 3], grpo[:, 3], atol=1e-5)
    assert torch.allclose(a[:, :3].mean(-1), grpo[:, 0], atol=1e-5)
    assert torch.allclose(a[[1, 3]], grpo[[1, 3], :4], atol=1e-5)
    # symmetric players (adjacent identical steps) get the same credit
    assert float(a[0, 0]) == pytest.approx(float(a[0, 1]), abs=1e-4) and float(a[2, 1]) == pytest.approx(float(a[2, 2]), abs=1e-4)
    phi = res.credit[:, :3].double()
    answer = enc("answer 11\n")

    def v(i, kept):
        tr = trajs[i]
        ctx = list(tr.prompt_ids)
        for k in kept:
            a, b = tr.turns[k].action_span
            ctx += tr.response_ids[a:b]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + answer])).logits[0].float(), -1)
        return float(logp[len(ctx) - 1 : len(ctx) - 1 + len(answer)].gather(-1, torch.tensor(answer)[:, None]).sum())

    for i in range(4):  # efficiency against direct, unbatched forward passes
        assert float(phi[i].sum()) == pytest.approx(v(i, [0, 1, 2]) - v(i, []), abs=1e-4)
    assert float(phi[0, 0]) == pytest.approx(float(phi[0, 1]), abs=1e-5)  # adjacent identical steps
    assert float(phi[2, 1]) == pytest.approx(float(phi[2, 2]), abs=1e-5)
    # differs (successes whose Shapley values sum to > 0): a - z is proportional to share - 1/n
    informative = [i for i in (0, 2) if float(phi[i].sum()) > 1e-9]
    assert informative == [0, 2]  # the reasoning lines raise the answer's likelihood
    assert res.stats["fallback_rows"] == 2 and res.stats["fallback_failed"] == 2
    for i in informative:
        std = float(torch.tensor([1.0, 0.0, 1.0, 0.0]).std()) + 1e-6
        share = phi[i] / phi[i].sum()
        assert torch.allclose(a[i, :3] - grpo[i, 0], 3 * 1.0 * (share - 1 / 3) / std, atol=1e-4)
