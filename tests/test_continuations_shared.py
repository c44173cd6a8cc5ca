"""MC continuations at rollout speed (issue 14): a forked prefix is prefilled once for its k
continuations, and forked environments are restored from snapshots instead of replayed. Neither may
change what is sampled: same tokens and log-probs as per-row prefill, same environment states and
same continuation returns as replay."""

from __future__ import annotations

import random

import pytest
import torch

from environments.construct import build_env_batch
from environments.start import SlotPlayer, fork_snapshots, replay_environments
from environments.tasks.bifurcation import BifurcationConfig, BifurcationFamily, format_action
from stages.rollout.config import ModelConfig, RolloutConfig
from stages.rollout.continuations import MCContinuations
from stages.rollout.engine import GenerationRequest
from stages.rollout.hf_engine import HFEngine
from stages.rollout.policy import build_tiny_policy
from stages.schema import Turn


@pytest.fixture(scope="module")
def policy():
    family = BifurcationFamily(BifurcationConfig(horizon=5, slip_prob=0.3))
    texts = [p + "".join(a + o for a, o in steps) for p, steps in family.warmup_corpus(64, 0)]
    torch.manual_seed(0)
    model, tok = build_tiny_policy(ModelConfig(), texts)
    return model.eval(), tok


def _requests():
    """Three forked prefixes (a group of 1, 2 and 3 rows) with suffixes of different lengths."""
    g = torch.Generator().manual_seed(1)
    reqs = []
    for p, n in enumerate((9, 14, 4)):
        prefix = torch.randint(5, 300, (n,), generator=g).tolist()
        for j in range(p + 1):
            suffix = torch.randint(5, 300, (2 * j,), generator=g).tolist()
            reqs.append(GenerationRequest(prefix + suffix, seed=1000 + 10 * p + j, shared_prefix=len(prefix)))
    return reqs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_gives_the_tokens_and_logprobs_of_per_row_prefill(policy, temperature):
    model, tok = policy
    engine = HFEngine(model, pad_token_id=tok.pad_token_id)
    reqs = _requests()
    before = engine.stats["forward_passes"]
    shared = engine.generate(reqs, 5, set(), temperature)
    assert engine.stats["forward_passes"] - before == 2 + 4  # prefix prefill, suffix prefill, 4 decode steps
    for r, out in zip(reqs, shared):  # each row alone: one plain prefill of its whole context
        alone = engine.generate([GenerationRequest(r.context_ids, r.seed)], 5, set(), temperature)[0]
        assert out.token_ids == alone.token_ids  # greedy: same argmax; sampled: same draw at the same seed
        assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(alone.logprobs), atol=1e-5)
        assert torch.allclose(torch.tensor(out.entropies), torch.tensor(alone.entropies), atol=1e-5)
    # a hint that is wrong (prefixes that differ) or too long (a whole context) changes nothing either
    bad = [GenerationRequest(r.context_ids, r.seed, shared_prefix=10_000) for r in reqs]
    assert [o.token_ids for o in engine.generate(bad, 5, set(), temperature)] == [o.token_ids for o in shared]



@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chunked_generation_returns_each_row_what_one_batch_gives_it_in_the_callers_order(policy, temperature):
    """A call larger than ``max_batch_rows`` runs in chunks of rows sorted by context length; each row
    still gets the tokens and log-probs it gets in one batch, at its own place in the output."""
    model, tok = policy
    reqs = _requests()[::-1]  # the longest contexts first: sorting reorders them
    whole = HFEngine(model, pad_token_id=tok.pad_token_id).generate(reqs, 5, set(), temperature)
    engine = HFEngine(model, pad_token_id=tok.pad_token_id, max_batch_rows=2)
    chunked = engine.generate(reqs, 5, set(), temperature)
    assert engine.stats["calls"] == 1 and engine.stats["forward_passes"] > 6  # 3 chunks, each its own loop
    for a, b in zip(whole, chunked):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    with pytest.raises(ValueError, match="max_batch_rows must be >= 1"):
        HFEngine(model, max_batch_rows=0)

def _recorded_episode(family, slot, rng):
    """Play one episode with random (sometimes invalid) actions; its turns as the rollout records them."""
    env = family.make(slot.instance, episode_seed=slot.episode_seed)
    env.reset()
    turns = []
    while not env.done:
        text = rng.choice([format_action("A"), format_action("B"), " x\n"])
        res = env.step(text)
        turns.append(Turn(index=len(turns), action_span=(0, 0), obs_span=(0, 0), action_text=text,
                          observation=res.observation, reward=res.reward, state_key=res.state_key))
    return turns


def test_snapshot_restore_yields_the_state_of_replay():
    family = BifurcationFamily(BifurcationConfig(horizon=6, slip_prob=0.4, num_decisive=3))
    envb = build_env_batch(family, 3, 2, family.pool_size("train"), 0, 7)
    rng = random.Random(0)
    turns = [_recorded_episode(family, s, rng) for s in envb.slots]
    points = [set(range(len(t) + 1)) for t in turns]
    handles, made, steps = fork_snapshots(family, envb.slots, turns, points)
    assert made == len(envb.slots) and steps == sum(len(t) for t in turns)  # one replay per episode
    for slot, recorded, got in zip(envb.slots, turns, handles):
        for t in range(1, len(recorded) + 1):
            restored = family.make(slot.instance, episode_seed=slot.episode_seed)
            restored.reset()
            restored.restore(got[t])
            replayed = family.make(slot.instance, episode_seed=slot.episode_seed)
            replayed.reset()
            assert replay_environments([replayed], [slot], [recorded[:t]], family.name) == t
            assert restored.snapshot() == replayed.snapshot() and restored.state_key() == replayed.state_key()
            for turn in recorded[t:]:  # the same future: identical transitions (slips included)
                a, b = restored.step(turn.action_text), replayed.step(turn.action_text)
                assert (a.observation, a.reward, a.done, a.state_key, a.success) == \
                       (b.observation, b.reward, b.done, b.state_key, b.success)


def test_continuations_from_snapshots_equal_continuations_from_replay(policy):
    model, tok = policy
    family = BifurcationFamily(BifurcationConfig(horizon=5, slip_prob=0.3))
    rollout = RolloutConfig(tasks_per_iteration=2, group_size=2)
    player = SlotPlayer(family=family, engine=HFEngine(model, pad_token_id=tok.pad_token_id), tokenizer=tok,
                        rollout=rollout)
    envb = build_env_batch(family, 2, 2, family.pool_size("train"), 0, 3)
    batch, _, _ = player.play(envb.slots, 11, 1.0)
    starts = [(r, turn.action_span[0]) for r, t in enumerate(batch.trajectories) for turn in t.turns]
    seed_for = lambda name: 5  # noqa: E731
    got = {}
    for snap in (True, False):
        mc = MCContinuations(player, envb, batch, seed_for, snapshots=snap)
        got[snap] = mc(starts, 3)
    (r_snap, o_snap), (r_rep, o_rep) = got[True], got[False]
    assert torch.equal(r_snap, r_rep)  # same samples, same environments: the same returns
    assert o_snap.extra_tokens == o_rep.extra_tokens
    forks_after_0 = sum(1 for r, p in starts if p > batch.trajectories[r].turns[0].action_span[0])
    assert o_snap.env_restores == 3 * forks_after_0 and o_rep.env_restores == 0
    assert o_snap.env_replay_steps == sum(len(t.turns) - 1 for t in batch.trajectories)
    assert o_rep.env_replay_steps == 3 * sum(n for t in batch.trajectories for n in range(len(t.turns)))
    assert o_snap.env_steps - o_snap.env_replay_steps == o_rep.env_steps - o_rep.env_replay_steps
