"""Stage 2 (rollout, survey §8): tiny policy, HF engine, agent loop, format warm-up, caching."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import pytest
import torch

from environments.base import EnvConfig, Environment, StepResult, TaskFamily, TaskInstance
from stages.rollout.agent_loop import rollout_stats, run_episodes, stop_token_ids
from stages.rollout.config import ModelConfig, RolloutConfig
from stages.rollout.engine import GenerationOutput, GenerationRequest, RolloutEngine
from stages.rollout.hf_engine import HFEngine
from stages.rollout.policy import (
    build_tiny_policy,
    count_parameters,
    get_policy,
    load_policy,
    sequence_logprobs,
)
from stages.rollout.warmup import warmup
from stages.schema import Batch, BatchTensors

LETTERS = "ABC"


# --------------------------------------------------------------------------- test doubles


@dataclasses.dataclass
class ScriptedConfig(EnvConfig):
    name: str = "scripted-test"
    horizon: int = 3


class ScriptedEnv(Environment):
    """Deterministic: ``horizon`` turns, valid actions A/B/C; A at step 0 earns a turn reward of
    0.5; the episode succeeds (terminal reward 1.0) if the last action is C."""

    def __init__(self, task_id: str, horizon: int):
        self.task_id, self.horizon, self.t, self.history = task_id, horizon, 0, []

    def reset(self) -> str:
        self.t, self.history = 0, []
        return f"Task {self.task_id}: pick one of A B C each step.\nStep 0. Action: "

    def state_key(self) -> str:
        return f"{self.task_id}/{self.t}/{''.join(self.history)}"

    def step(self, action_text: str) -> StepResult:
        a = action_text.strip()
        if a not in LETTERS or len(a) != 1:
            return StepResult("Invalid action. Episode over.", 0.0, True, None, self.state_key(), False, "invalid_action")
        reward = 0.5 if (self.t == 0 and a == "A") else 0.0
        self.history.append(a)
        self.t += 1
        if self.t >= self.horizon:
            ok = a == "C"
            term = 1.0 if ok else 0.0  # like bifurcation (and gym): the step reward includes the terminal part
            return StepResult(
                f"You played {a}. Episode over.", reward + term, True, a, self.state_key(), ok,
                "success" if ok else "failure", {"terminal_reward": term},
            )
        return StepResult(f"You played {a}.\nStep {self.t}. Action: ", reward, False, a, self.state_key())


class ScriptedFamily(TaskFamily):
    name = "scripted-test"
    Config = ScriptedConfig

    def instances(self, split: str, n: int, seed: int) -> list[TaskInstance]:
        return [TaskInstance(f"{split}-{seed}-{i}", split, seed * 1000 + i) for i in range(n)]

    def make(self, instance: TaskInstance, sandbox=None, episode_seed: int = 0) -> Environment:
        return ScriptedEnv(instance.task_id, self.cfg.horizon)

    def describe(self) -> dict[str, str]:
        return {"data": "scripted test double"}

    def warmup_corpus(self, n: int, seed: int):
        import random

        rng = random.Random(seed)
        out = []
        for i in range(n):
            env = ScriptedEnv(f"w{i}", self.cfg.horizon)
            prompt = env.reset()
            steps = []
            done = False
            while not done:
                a = rng.choice(LETTERS)
                res = env.step(a)
                steps.append((a, res.observation))
                done = res.done
            out.append((prompt, steps))
        return out


class ScriptedEngine(RolloutEngine):
    """Returns the tokens of a fixed per-turn action text (test double for the agent loop)."""

    name = "scripted"

    def __init__(self, tokenizer, actions: list[str]):
        self.tokenizer, self.actions, self.turn, self.calls = tokenizer, actions, 0, []

    def _generate(self, requests, max_new_tokens, stop_token_ids, temperature, top_p):
        self.calls.append(len(requests))
        ids = self.tokenizer.encode(self.actions[self.turn], add_special_tokens=False)[:max_new_tokens]
        self.turn += 1
        fin = "stop" if ids and ids[-1] in stop_token_ids else "length"
        return [GenerationOutput(list(ids), [-0.25] * len(ids), [1.5] * len(ids), fin) for _ in requests]


def _bifurcation_family(**overrides) -> Optional[TaskFamily]:
    try:
        import environments.tasks  # noqa: F401  (registers the built-in families)
        from environments.registry import get_family_class

        cls = get_family_class("bifurcation")
    except (KeyError, ImportError):
        return None
    cfg = cls.Config(**overrides)
    return cls(cfg)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: intra-op threads only add contention (10x slower on a busy
    2-core machine). Restored afterwards, so other test modules are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny():
    fam = ScriptedFamily(ScriptedConfig())
    texts = ["".join([p] + [a + "\n" + o for a, o in s]) for p, s in fam.warmup_corpus(64, 0)]
    model, tok = build_tiny_policy(ModelConfig(**SMALL), texts)
    return model, tok


def _pack(contexts, outs, pad=0):
    """Left-pad contexts, right-pad outputs, as BatchTensors does."""
    P = max(len(c) for c in contexts)
    R = max(len(o.token_ids) for o in outs)
    B = len(contexts)
    ids = torch.full((B, P + R), pad, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, (c, o) in enumerate(zip(contexts, outs)):
        ids[i, P - len(c) : P] = torch.tensor(c)
        ids[i, P : P + len(o.token_ids)] = torch.tensor(o.token_ids, dtype=torch.long)
        am[i, P - len(c) : P + len(o.token_ids)] = 1
    return ids, am, (am.cumsum(-1) - 1).clamp(min=0), P


# --------------------------------------------------------------------------- tokenizer / model


def test_tokenizer_single_tokens(tiny):
    _, tok = tiny
    for text in ["\n"] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]:
        assert len(tok.encode(text, add_special_tokens=False)) == 1, text
    # a letter followed by the stop token never merges into one token
    assert len(tok.encode("A\n", add_special_tokens=False)) == 2
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|eos|>"
    assert tok.pad_token_id != tok.eos_token_id
    # any text encodes (byte-level) and round-trips
    s = "Zürich: x=3 {ok}\n\tÄ"
    assert tok.decode(tok.encode(s, add_special_tokens=False)) == s
    stops = stop_token_ids(tok)
    assert {tok.encode("\n", add_special_tokens=False)[0], tok.eos_token_id} <= stops
    assert all(i == tok.eos_token_id or "\n" in tok.decode([i]) for i in stops)


def test_tiny_model_size_and_determinism(tiny):
    fam = ScriptedFamily(ScriptedConfig())
    texts = ["".join([p] + [a + "\n" + o for a, o in s]) for p, s in fam.warmup_corpus(64, 0)]
    m1, t1 = build_tiny_policy(ModelConfig(), texts)
    n = count_parameters(m1)
    assert 100_000 < n < 250_000, n
    # untied by default (tied embeddings collapse the cue embeddings under Adam, see ModelConfig)
    assert not m1.config.tie_word_embeddings
    assert m1.get_input_embeddings().weight is not m1.get_output_embeddings().weight
    tied, _ = build_tiny_policy(ModelConfig(tie_embeddings=True), texts)
    assert tied.get_input_embeddings().weight is tied.get_output_embeddings().weight
    m2, t2 = build_tiny_policy(ModelConfig(), texts)
    assert t1.get_vocab() == t2.get_vocab()
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    m3, _ = build_tiny_policy(ModelConfig(init_seed=1), texts)
    assert not torch.equal(m1.model.embed_tokens.weight, m3.model.embed_tokens.weight)


# --------------------------------------------------------------------------- engine


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_engine_logprobs_match_full_forward(tiny, temperature):
    model, tok = tiny
    contexts = [tok.encode(s, add_special_tokens=False) for s in ["Task 1: pick", "A", "Step 0. Action: ", "x y z w v"]]
    eng = HFEngine(model)
    outs = eng.generate([GenerationRequest(c, i) for i, c in enumerate(contexts)], 9, stop_token_ids(tok), temperature)
    ids, am, pos, P = _pack(contexts, outs, tok.pad_token_id)
    with torch.no_grad():
        lp, ent = sequence_logprobs(model, ids, am, pos, P, temperature=temperature)
    for i, o in enumerate(outs):
        n = len(o.token_ids)
        assert n >= 1
        assert torch.allclose(lp[i, :n], torch.tensor(o.logprobs), atol=1e-4), (lp[i, :n], o.logprobs)
        assert torch.allclose(ent[i, :n], torch.tensor(o.entropies), atol=1e-4)


def test_temperature_scaling(tiny):
    model, tok = tiny
    ctx = [tok.encode("Step 0. Action: ", add_special_tokens=False)] * 16
    eng = HFEngine(model)
    mean_ent = {}
    for T in (0.3, 1.0, 3.0):
        outs = eng.generate([GenerationRequest(c, i) for i, c in enumerate(ctx)], 1, set(), T)
        mean_ent[T] = sum(o.entropies[0] for o in outs) / len(outs)
        # the recorded log-prob is log_softmax(logits / T) of the sampled token
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ctx[:1])).logits[0, -1]
        ref = torch.log_softmax(logits / T, -1)
        for o in outs:
            assert abs(ref[o.token_ids[0]].item() - o.logprobs[0]) < 1e-4
    assert mean_ent[0.3] < mean_ent[1.0] < mean_ent[3.0]
    # greedy
    outs = eng.generate([GenerationRequest(ctx[0], 0)], 3, set(), 0.0)
    assert outs[0].logprobs == [0.0, 0.0, 0.0]


def test_top_p(tiny):
    model, tok = tiny
    ctx = [tok.encode("Task 2: pick one", add_special_tokens=False)] * 8
    eng = HFEngine(model)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ctx[:1])).logits[0, -1]
    top = int(logits.argmax())
    outs = eng.generate([GenerationRequest(c, i) for i, c in enumerate(ctx)], 1, set(), 1.0, top_p=1e-6)
    for o in outs:  # nucleus of one token: the argmax with probability 1
        assert o.token_ids == [top] and abs(o.logprobs[0]) < 1e-6 and abs(o.entropies[0]) < 1e-6
    full = torch.log_softmax(logits, -1)
    outs = eng.generate([GenerationRequest(c, i) for i, c in enumerate(ctx)], 1, set(), 1.0, top_p=0.5)
    for o in outs:  # renormalised over the nucleus: log-prob above the full-distribution one
        assert o.logprobs[0] > full[o.token_ids[0]].item()


def test_stop_handling(tiny):
    model, tok = tiny
    contexts = [tok.encode(s, add_special_tokens=False) for s in ["a", "bb bb", "Step 0. Action: "]] * 4
    reqs = [GenerationRequest(c, i) for i, c in enumerate(contexts)]
    eng = HFEngine(model)
    V = len(tok)
    outs = eng.generate(reqs, 5, set(range(V)), 1.0)  # every token stops
    assert all(len(o.token_ids) == 1 and o.finish_reason == "stop" for o in outs)
    outs = eng.generate(reqs, 5, {V + 10}, 1.0)  # nothing stops
    assert all(len(o.token_ids) == 5 and o.finish_reason == "length" for o in outs)
    half = set(range(0, V, 2))  # about half the tokens stop
    outs = eng.generate(reqs, 6, half, 1.0)
    assert any(o.finish_reason == "stop" and len(o.token_ids) > 1 for o in outs)
    for o in outs:
        assert not any(t in half for t in o.token_ids[:-1])  # nothing after a stop token
        assert (o.token_ids[-1] in half) == (o.finish_reason == "stop")
        assert len(o.logprobs) == len(o.entropies) == len(o.token_ids)
        assert all(math.isfinite(x) and x <= 0 for x in o.logprobs)


def test_reproducibility(tiny):
    model, tok = tiny
    contexts = [tok.encode(s, add_special_tokens=False) for s in ["a", "bb bb", "Step 0. Action: "]] * 3
    eng = HFEngine(model)
    run = lambda off: eng.generate([GenerationRequest(c, i + off) for i, c in enumerate(contexts)], 6, set(), 1.0)
    a, b, c = run(0), run(0), run(1000)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


@pytest.mark.parametrize("engine", ["hf", "scripted"])
def test_generate_checks_its_arguments_for_every_engine(tiny, engine):
    """The argument checks live in RolloutEngine.generate: an engine implements only _generate."""
    model, tok = tiny
    eng = HFEngine(model) if engine == "hf" else ScriptedEngine(tok, ["a\n"])
    ok = [GenerationRequest([1, 2], 0)]
    assert eng.generate([], 4, set()) == []
    for kwargs, msg in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=0.0), "top_p"),
                        (dict(temperature=-1.0), "temperature")]:
        args = dict(max_new_tokens=4, temperature=1.0, top_p=1.0) | kwargs
        with pytest.raises(ValueError, match=msg):
            eng.generate(ok, args["max_new_tokens"], set(), args["temperature"], args["top_p"])
    with pytest.raises(ValueError, match="request 1 has an empty context"):
        eng.generate(ok + [GenerationRequest([], 1)], 4, set())
    if engine == "scripted":
        assert eng.calls == []  # nothing reached the engine's own sampling
    assert len(eng.generate(ok, 4, set())) == 1


# --------------------------------------------------------------------------- agent loop


def _envs(fam, n, seed=0):
    insts = fam.instances("train", n, seed)
    return insts, [fam.make(i) for i in insts]


def test_agent_loop_scripted_engine_rewards_and_spans(tiny):
    _, tok = tiny
    fam = ScriptedFamily(ScriptedConfig(horizon=3))
    insts, envs = _envs(fam, 4)
    eng = ScriptedEngine(tok, ["A\n", "B\n", "C\n"])
    trajs = run_episodes(eng, tok, envs, [0, 0, 1, 1], [i.task_id for i in insts], [f"u{i}" for i in range(4)],
                         "scripted-test", RolloutConfig(), seed=3)
    assert eng.calls == [4, 4, 4]  # one batched engine call per turn
    for tr in trajs:
        tr.validate()
        assert tr.success and tr.done_reason == "success" and tr.reward == 1.0
        assert [t.reward for t in tr.turns] == [0.5, 0.0, 0.0]  # terminal reward not double counted
        assert [t.action for t in tr.turns] == ["A", "B", "C"]
        assert tr.turns[0].state_key.endswith("/0/") and tr.turns[2].state_key.endswith("/2/AB")
        assert tr.meta["env_steps"] == 3 and tr.meta["env_resets"] == 1
        for t in tr.turns:
            a, b = t.action_span
            assert all(tr.policy_mask[a:b]) and tr.logprobs[a:b] == [-0.25] * (b - a)
            o0, o1 = t.obs_span
            assert a < b == o0 <= o1
            assert not any(tr.policy_mask[o0:o1]) and tr.logprobs[o0:o1] == [0.0] * (o1 - o0)
            assert tok.decode(tr.response_ids[a:b]) == t.action_text
            assert tok.decode(tr.response_ids[o0:o1]) == t.observation
        assert tr.turns[-1].obs_span[1] == len(tr.response_ids)
    bt = BatchTensors.from_batch(Batch(trajs), pad_token_id=tok.pad_token_id)
    assert torch.allclose(bt.token_level_rewards.sum(-1), torch.full((4,), 1.5))


def test_agent_loop_length_cut(tiny):
    _, tok = tiny
    fam = ScriptedFamily(ScriptedConfig(horizon=50))
    insts, envs = _envs(fam, 2)
    eng = ScriptedEngine(tok, ["A\n"] * 50)
    cfg = RolloutConfig(max_context_tokens=60, max_new_tokens_per_turn=4)
    trajs = run_episodes(eng, tok, envs, [0, 1], [i.task_id for i in insts], ["a", "b"], "scripted-test", cfg, 0)
    for tr in trajs:
        assert tr.done_reason == "length" and tr.reward == 0.0 and not tr.success
        assert 1 <= len(tr.turns) < 50
        assert len(tr.prompt_ids) + len(tr.response_ids) + 4 > 60
        assert len(tr.prompt_ids) + tr.turns[-1].action_span[0] + 4 <= 60


def _check_real_engine_trajs(trajs, tok, model, temperature):
    for tr in trajs:
        tr.validate()
        assert tr.turns, tr.done_reason
        for t in tr.turns:
            a, b = t.action_span
            assert b > a and all(tr.policy_mask[a:b])
            assert tok.decode(tr.response_ids[a:b], skip_special_tokens=True) == t.action_text
            o0, o1 = t.obs_span
            assert not any(tr.policy_mask[o0:o1])
            assert tok.decode(tr.response_ids[o0:o1]) == t.observation
    # the update's recomputed log-probs equal the behaviour log-probs (policy tokens)
    bt = BatchTensors.from_batch(Batch(trajs), pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        lp, _ = sequence_logprobs(model, bt.input_ids, bt.attention_mask, bt.position_ids, bt.prompt_len, temperature)
    m = bt.response_mask.bool()
    assert (lp[m] - bt.old_logprobs[m]).abs().max().item() < 1e-4


def test_agent_loop_hf_engine_scripted_env(tiny):
    model, tok = tiny
    fam = ScriptedFamily(ScriptedConfig(horizon=3))
    insts, envs = _envs(fam, 6)
    cfg = RolloutConfig(temperature=0.9, max_new_tokens_per_turn=3)
    trajs = run_episodes(HFEngine(model), tok, envs, list(range(6)), [i.task_id for i in insts],
                         [f"u{i}" for i in range(6)], "scripted-test", cfg, seed=1)
    _check_real_engine_trajs(trajs, tok, model, 0.9)
    again = run_episodes(HFEngine(model), tok, [fam.make(i) for i in insts], list(range(6)),
                         [i.task_id for i in insts], [f"u{i}" for i in range(6)], "scripted-test", cfg, seed=1)
    assert [t.response_ids for t in trajs] == [t.response_ids for t in again]


def test_agent_loop_bifurcation(tiny):
    fam = _bifurcation_family()
    if fam is None:
        pytest.skip("environments/tasks/bifurcation.py not available")
    model, tok = tiny
    insts = fam.instances("train", 8, 0)
    envs = [fam.make(i) for i in insts]
    trajs = run_episodes(HFEngine(model), tok, envs, list(range(8)), [i.task_id for i in insts],
                         [f"b{i}" for i in range(8)], fam.name, RolloutConfig(), seed=0)
    _check_real_engine_trajs(trajs, tok, model, 1.0)
    for tr in trajs:
        assert tr.ground_truth is None or len(tr.ground_truth.advantage) == len(tr.turns)


# --------------------------------------------------------------------------- warm-up / caching / loading


def _warm_cfg(**kw):
    base = dict(SMALL, hidden_size=48, intermediate_size=128, warmup_steps=80, warmup_batch_size=16, warmup_lr=3e-3)
    base.update(kw)
    return ModelConfig(**base)


def _assert_format_not_answer(stats, n_letters):
    assert stats["valid_action_rate_before"] < 0.2, stats
    assert stats["valid_action_rate"] > 0.9, stats
    freq = stats["action_frequencies"]
    assert len(freq) == n_letters, freq
    assert max(freq.values()) < 2.0 / n_letters, freq  # roughly uniform: no answer learned


def test_warmup_teaches_format_scripted():
    fam = ScriptedFamily(ScriptedConfig())
    cfg = _warm_cfg()
    texts = ["".join([p] + [a + "\n" + o for a, o in s]) for p, s in fam.warmup_corpus(128, 0)]
    model, tok = build_tiny_policy(cfg, texts)
    stats = warmup(model, tok, fam, cfg, seed=0)
    assert stats["final_loss"] < stats["first_loss"]
    _assert_format_not_answer(stats, 3)


def test_warmup_teaches_format_bifurcation():
    fam = _bifurcation_family()
    if fam is None:
        pytest.skip("environments/tasks/bifurcation.py not available")
    cfg = _warm_cfg()
    texts = ["".join([p] + [(a if a.endswith("\n") else a + "\n") + o for a, o in s]) for p, s in fam.warmup_corpus(128, 0)]
    model, tok = build_tiny_policy(cfg, texts)
    stats = warmup(model, tok, fam, cfg, seed=0)
    _assert_format_not_answer(stats, fam.cfg.num_actions)


def test_get_policy_caches(tmp_path):
    fam = ScriptedFamily(ScriptedConfig())
    cfg = _warm_cfg(warmup_steps=5)
    m1, t1, info1 = get_policy(cfg, fam, tmp_path, seed=0)
    assert not info1["from_cache"] and Path(info1["cache_path"]).is_dir()
    assert Path(info1["cache_path"]).parent == tmp_path / "models"
    assert Path(info1["cache_path"]).name == f"{cfg.name}-{info1['config_hash']}"
    assert info1["num_parameters"] == count_parameters(m1) and "final_loss" in info1["warmup"]
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no temp dirs left
    m2, t2, info2 = get_policy(cfg, fam, tmp_path, seed=0)
    assert info2["from_cache"] and info2["config_hash"] == info1["config_hash"]
    assert info2["warmup"]["final_loss"] == pytest.approx(info1["warmup"]["final_loss"])
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert t1.get_vocab() == t2.get_vocab()
    # a different env config or model config is a different cache entry
    _, _, info3 = get_policy(cfg, ScriptedFamily(ScriptedConfig(horizon=4)), tmp_path, seed=0)
    assert info3["config_hash"] != info1["config_hash"] and not info3["from_cache"]


def test_load_policy_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_policy(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_policy(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="model.path"):
        get_policy(ModelConfig(path=str(tmp_path / "nope")), ScriptedFamily(ScriptedConfig()), tmp_path, 0)


def test_saved_model_dir_loads(tiny, tmp_path):
    model, tok = tiny
    d = tmp_path / "hfdir"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    m2, t2 = load_policy(d)
    assert t2.pad_token_id == tok.pad_token_id and t2.encode("A\n", add_special_tokens=False) == tok.encode("A\n", add_special_tokens=False)
    x = torch.tensor([tok.encode("Step 0. Action: ", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, m2(input_ids=x).logits, atol=1e-6)
    # and through get_policy with model.path
    m3, t3, info = get_policy(ModelConfig(path=str(d)), ScriptedFamily(ScriptedConfig()), tmp_path, 0)
    assert info["num_parameters"] == count_parameters(model) and not info["from_cache"]
    # a tokenizer saved without a pad token gets pad = eos
    t2.pad_token = None
    d2 = tmp_path / "nopad"
    model.save_pretrained(d2)
    t2.save_pretrained(d2)
    _, t4 = load_policy(d2)
    assert t4.pad_token_id == t4.eos_token_id


def test_rollout_stats(tiny):
    _, tok = tiny
    fam = ScriptedFamily(ScriptedConfig(horizon=2))
    insts, envs = _envs(fam, 3)
    trajs = run_episodes(ScriptedEngine(tok, ["C\n", "C\n"]), tok, envs, [0, 1, 2], [i.task_id for i in insts],
                         ["x", "y", "z"], "scripted-test", RolloutConfig(), 0)
    s = rollout_stats(trajs)
    assert s["env_steps"] == 6 and s["env_resets"] == 3 and s["success_rate"] == 1.0 and s["valid_action_rate"] == 1.0


def test_bifurcation_return_is_not_double_counted(tiny):
    """sum(turn rewards) + terminal reward == sum of the environment's step rewards."""
    import environments.tasks  # noqa: F401  (registers the built-in families)
    from environments.registry import get_family_class
    from stages.rollout.agent_loop import run_episodes
    from stages.rollout.config import RolloutConfig
    from stages.rollout.hf_engine import HFEngine

    fam_cls = get_family_class("bifurcation")
    fam = fam_cls(fam_cls.Config(decisive_reward=0.25))
    model, tok = tiny
    inst = fam.instances("train", 8, 0)
    envs = [fam.make(i) for i in inst]
    trajs = run_episodes(HFEngine(model), tok, envs, list(range(8)), [i.task_id for i in inst],
                         [f"u{k}" for k in range(8)], "bifurcation", RolloutConfig(), seed=0)
    for tr in trajs:
        steps_total = sum(t.info.get("turn_reward", 0.0) for t in tr.turns) if all(
            "turn_reward" in t.info for t in tr.turns) else None
        assert tr.reward in (0.0, 1.0)
        assert all(t.reward in (0.0, 0.25) for t in tr.turns)
        if steps_total is not None:
            assert sum(t.reward for t in tr.turns) == pytest.approx(steps_total)
