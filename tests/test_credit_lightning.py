"""Agent Lightning (Luo et al. 2025; survey §5.7): LightningRL's credit (the episode's
group-normalised reward to every transition and token, episodes counted once), its differential
against GRPO, and the decoupled execution: the OpenAI-compatible endpoint, the example agent
program (examples/lightning_agent.py) run as a subprocess, calls -> transitions, and the faults
(an agent that never reports, one that crashes) ending episodes with a recorded reason."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

import pytest
import torch

from environments.construct import build_env_batch
from environments.tasks.lightning import LightningConfig, LightningFamily, render_chat
from stages.credit.base import CreditContext
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.registry import get_method_class
from stages.rollout.config import RolloutConfig
from stages.rollout.engine import GenerationOutput
from stages.rollout.lightning import AgentProgramPlayer, EpisodeStore, LightningServer
from stages.schema import Batch, Trajectory, Turn

AGENT = f"{sys.executable} examples/lightning_agent.py"


# ----------------------------------------------------------------------------- helpers
def get_method(name, **cfg):
    cls = get_method_class(name)
    return cls(cls.Config(**cfg))


def _row(uid, group, reward, episode=None, n=3):
    """A one-turn row of ``n`` policy tokens (then one observation token) with its episode id."""
    return Trajectory(uid=uid, group_id=group, task_id=f"t{group}", env_name="lightning", prompt_ids=[1, 2],
                      response_ids=[5] * (n + 1), policy_mask=[True] * n + [False], logprobs=[-0.5] * n + [0.0],
                      entropies=[0.0] * (n + 1),
                      turns=[Turn(index=0, action_span=(0, n), obs_span=(n, n + 1), action_text="7", observation="x",
                                  reward=0.0)],
                      reward=reward, meta={"episode": episode or uid})


def _credit(batch, **cfg):
    method = get_method("lightning", **cfg)
    tensors = batch.to_tensors()
    return method(tensors, batch, CreditContext()), tensors


def _grpo(batch):
    tensors = batch.to_tensors()
    return get_method("grpo")(tensors, batch, CreditContext()).advantages


# ----------------------------------------------------------------------------- credit
def test_every_token_of_every_call_of_an_episode_gets_its_episode_advantage_counted_once():
    """Group 0: episodes a (R=1, split over 3 rows: an agent that rewrote its context twice) and
    b (R=0, one row). Over episodes, mean 0.5 and std 1/sqrt(2): A_a = +1/sqrt(2), A_b = -1/sqrt(2)
    on every policy token of every row of them. A transition-weighted baseline (mean 0.75 over the 4
    rows) gives other numbers: an implementation that counts rows fails."""
    rows = [_row("a", 0, 1.0, "a"), _row("a.r1", 0, 1.0, "a"), _row("a.r2", 0, 1.0, "a"), _row("b", 0, 0.0),
            _row("c", 1, 0.3), _row("d", 1, 0.3)]
    res, tensors = _credit(Batch(rows))
    mask = tensors.response_mask.bool()
    want = torch.tensor([1, 1, 1, -1, 0, 0], dtype=torch.float32) * 0.5 / (2 ** -0.5 + 1e-6)
    for b in range(len(rows)):
        assert torch.allclose(res.advantages[b][mask[b]], want[b].expand(int(mask[b].sum())), atol=1e-5)
        assert (res.advantages[b][~mask[b]] == 0).all()  # observation tokens get nothing
    assert res.stats["episodes"] == 4 and res.stats["split_episode_fraction"] == pytest.approx(0.25)
    assert res.granularity == "turn" and torch.allclose(res.credit[:, 0], want, atol=1e-5)
    # the per-transition baseline weighs episode a three times: mean 0.75 over the group's 4 rows
    per_row, _ = _credit(Batch(rows), baseline="transitions")
    assert not torch.allclose(per_row.advantages, res.advantages, atol=1e-3)
    assert per_row.advantages[3][0] == pytest.approx(-0.75 / (0.5 + 1e-6), abs=1e-5)  # std of [1,1,1,0] is 0.5


def test_reduces_to_grpo_when_every_episode_is_one_row_and_per_row_grpo_otherwise():
    one_row = Batch([_row(f"e{i}", i // 3, float(r)) for i, r in enumerate([1, 0, 0.5, 0, 0, 1])])
    res, _ = _credit(one_row)
    assert torch.equal(res.advantages, _grpo(one_row))
    split = Batch([_row("a", 0, 1.0, "a"), _row("a.r1", 0, 1.0, "a"), _row("b", 0, 0.0), _row("c", 0, 0.5)])
    assert torch.equal(_credit(split, baseline="transitions")[0].advantages, _grpo(split))
    assert not torch.allclose(_credit(split)[0].advantages, _grpo(split), atol=1e-3)
    assert res.overhead.forward_tokens == 0 and res.overhead.env_steps == 0  # no extra compute


def test_config_rules_and_refusals():
    from flows.config import ConfigError, load_config

    with pytest.raises(ValueError, match="baseline"):
        get_method("lightning", baseline="calls")
    with pytest.raises(ConfigError, match=r"^credit.method=vineppo: needs mc_rollouts .* outside agent program"):
        load_config(["env=lightning", "credit=vineppo"])
    with pytest.raises(ConfigError, match=r"^runner.rollout_shards=2: must be 1 for env.name=lightning"):
        load_config(["env=lightning", "credit=lightning", "runner.rollout_shards=2"])
    with pytest.raises(ConfigError, match=r"env.agent_command"):
        load_config(["env=lightning", "env.agent_command= "])
    with pytest.raises(ConfigError, match=r"rollout.group_size"):
        load_config(["env=lightning", "credit=lightning", "rollout.group_size=1"])


# ----------------------------------------------------------------------------- the endpoint
class ScriptedEngine:
    """A test double of the rollout engine: answers ``"<n>\\n"`` with n from the request seed."""

    def __init__(self, tokenizer):
        self.tok, self.contexts, self.stats = tokenizer, [], {}

    def generate(self, requests, max_new_tokens, stop_ids, temperature, top_p):
        outs = []
        for r in requests:
            self.contexts.append(list(r.context_ids))
            ids = self.tok(f"{r.seed % 20}\n", add_special_tokens=False)["input_ids"][:max_new_tokens]
            outs.append(GenerationOutput(ids, [-0.25] * len(ids), [0.5] * len(ids), "stop"))
        return outs


@pytest.fixture(scope="module")
def tokenizer():
    from stages.rollout.policy import _episode_texts, build_tokenizer

    fam = LightningFamily(LightningConfig())
    return build_tokenizer(300, _episode_texts(fam.warmup_corpus(64, 0)))


def _player(tokenizer, **env):
    fam = LightningFamily(LightningConfig(**{"agent_command": AGENT, **env}))
    return fam, AgentProgramPlayer(fam, ScriptedEngine(tokenizer), tokenizer, RolloutConfig(max_new_tokens_per_turn=6))


def test_the_example_agent_plays_against_the_endpoint_and_its_calls_become_turns(tokenizer):
    fam, player = _player(tokenizer)
    envb = build_env_batch(fam, 2, 2, 8, iteration=0, seed=0)
    batch, overhead, gen = player.play(envb.slots, seed=11, temperature=1.0)
    assert batch.meta["agent_exit_code"] == 0 and batch.meta["dropped_groups"] == 0
    assert len(batch) == 4 and [t.uid for t in batch.trajectories] == [s.uid for s in envb.slots]
    for traj in batch.trajectories:  # a chat agent extending its history: one row, the two calls its turns
        traj.validate()
        assert len(traj.turns) == 2 and traj.meta["episode_rows"] == 1 and traj.meta["episode_calls"] == 2
        assert traj.done_reason in ("success", "failure") and 0.0 <= traj.reward <= 1.0
        t0, t1 = traj.turns
        # policy tokens exactly the completions, with the engine's log-probs; the follow-up question is an observation
        assert [i for i, m in enumerate(traj.policy_mask) if m] == [*range(*t0.action_span), *range(*t1.action_span)]
        assert all(traj.logprobs[i] == -0.25 for i in range(*t1.action_span))
        assert t0.observation.startswith("user: +") and t0.obs_span[1] == t1.action_span[0]
        # token-in-token-out: the second call's context is the recorded ids, which render the chat the agent sent
        ctx = traj.prompt_ids + traj.response_ids[: t1.action_span[0]]
        assert ctx in player.engine.contexts
        text = tokenizer.decode(ctx)
        assert text.startswith(traj.prompt_text) and text.endswith(t0.observation) and text.endswith("assistant: ")
        assert traj.prompt_text == render_chat([{"role": "user", "content": traj.prompt_text[6:].split("\n")[0]}])
    assert gen == sum(t.num_policy_tokens for t in batch.trajectories) and overhead.env_steps == 8
    # the same seed replays the same batch (per-call seeds from (seed, episode, call index))
    again, _, _ = _player(tokenizer)[1].play(envb.slots, seed=11, temperature=1.0)
    assert [t.response_ids for t in again.trajectories] == [t.response_ids for t in batch.trajectories]


def test_faults_end_episodes_with_a_reason_and_the_rollout_goes_on(tokenizer):
    """A program that skips episode 1's report: that episode ends 'no_reward' at reward 0, the
    rest as reported. A program that crashes after episode 2's first call: episode 2 ends
    'agent_exit:3' (kept at reward 0); episode 3 made no call, so its whole group (episodes 2 and 3)
    is dropped and counted; group 0 goes on."""
    fam, player = _player(tokenizer, agent_command=f"{AGENT} --no-reward-for 1")
    envb = build_env_batch(fam, 2, 2, 8, iteration=0, seed=0)
    uids = [s.uid for s in envb.slots]
    batch, _, _ = player.play(envb.slots, seed=3, temperature=1.0)
    got = {t.uid: t for t in batch.trajectories}
    assert batch.meta["agent_exit_code"] == 0 and set(got) == set(uids)
    assert got[uids[1]].done_reason == "no_reward" and got[uids[1]].reward == 0.0 and not got[uids[1]].success
    assert all(got[u].done_reason in ("success", "failure") for u in uids if u != uids[1])
    batch, _, _ = _player(tokenizer, agent_command=f"{AGENT} --crash-at 2")[1].play(envb.slots, seed=3, temperature=1.0)
    assert batch.meta["agent_exit_code"] == 3 and batch.meta["dropped_groups"] == 1
    assert batch.meta["episode_end_reasons"]["agent_exit:3"] == 2  # episodes 2 (one call) and 3 (none)
    assert [t.uid for t in batch.trajectories] == uids[:2] and "crash" not in batch.meta["agent_stderr_tail"]
    # a program that makes no call at all leaves nothing to train on: one clear error
    _, idle = _player(tokenizer, agent_command=f"{sys.executable} -c pass")
    with pytest.raises(RuntimeError, match="made no call for any of the 4 episodes"):
        idle.play(envb.slots, seed=3, temperature=1.0)
    # a program that hangs is killed at env.agent_timeout
    _, hang = _player(tokenizer, agent_command=f"{sys.executable} -c 'import time; time.sleep(30)'", agent_timeout=0.5)
    with pytest.raises(RuntimeError, match="exit code None"):
        hang.play(envb.slots, seed=3, temperature=1.0)


def _post(url, body, episode=None):
    headers = {"Content-Type": "application/json", **({"X-Episode-Id": episode} if episode else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_endpoint_protocol_rows_and_refusals(tokenizer):
    """/v1/completions with the ``user`` field; a prompt that does not extend the episode's context
    starts a new row; unknown episodes, too many calls, bad rewards and double reports are refused
    with OpenAI-style errors and counted."""
    fam = LightningFamily(LightningConfig(max_calls=3))
    slots = build_env_batch(fam, 1, 2, 8, iteration=0, seed=0).slots
    store = EpisodeStore(slots, ScriptedEngine(tokenizer), tokenizer, RolloutConfig(max_new_tokens_per_turn=6),
                         seed=0, max_calls=3)
    uid = slots[0].uid
    with LightningServer(store) as srv:
        st, out = _post(f"{srv.url}/completions", {"prompt": "Q: 1+1=?\nA: ", "user": uid})
        assert st == 200 and out["object"] == "text_completion" and not out["choices"][0]["text"].endswith("\n")
        first = out["choices"][0]["text"]
        assert _post(f"{srv.url}/completions", {"prompt": f"Q: 1+1=?\nA: {first}\nQ: +2=?\nA: ", "user": uid})[0] == 200
        assert _post(f"{srv.url}/completions", {"prompt": "fresh context: 3+3=?\nA: ", "user": uid})[0] == 200
        st, out = _post(f"{srv.url}/completions", {"prompt": "one more", "user": uid})
        assert st == 400 and out["error"]["code"] == "max_calls"
        assert _post(f"{srv.url}/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                     episode="nope")[1]["error"]["code"] == "unknown_episode"
        assert _post(f"{srv.url}/episodes/{uid}/reward", {"reward": float("nan")})[1]["error"]["code"] == "invalid_reward"
        assert _post(f"{srv.url}/episodes/{uid}/reward", {"reward": 0.5, "success": True})[0] == 200
        assert _post(f"{srv.url}/episodes/{uid}/reward", {"reward": 1.0})[1]["error"]["code"] == "episode_over"
        with urllib.request.urlopen(f"{srv.url}/models", timeout=10) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == store.model_name
    ep = store.episodes[uid]
    rows = ep.trajectories("lightning", "success", 0, 0.0)
    assert [len(r.turns) for r in rows] == [2, 1] and [r.meta["episode"] for r in rows] == [uid, uid]
    assert all(r.reward == 0.5 and r.success for r in rows) and rows[1].uid == f"{uid}.r1"
    assert store.refused == 4 and len(ep.refused) == 3
