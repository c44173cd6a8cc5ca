"""The PRM trained here (stages/reward/prm.py): learning, save/load, encoding; its CLI (flows/prm_cli.py)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from flows.prm_cli import collect_examples, examples_from_trajectories, main
from stages.reward.prm import (
    PRMConfig,
    build_prm,
    evaluate_prm,
    load_prm,
    save_prm,
    train_prm,
)
from stages.schema import Trajectory, Turn

SMALL = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, vocab_size=300)


def toy_examples(n: int, seed: int):
    """A separable but context-dependent labelling: the prompt names an operator, and a step is
    correct iff it uses that operator (so the PRM must read the prefix, not only the step)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        want = rng.choice("+-")
        steps, labels = [], []
        for _ in range(rng.randint(1, 4)):
            op = rng.choice("+-")
            steps.append(f"{rng.randint(0, 99)}{op}{rng.randint(0, 99)}={rng.randint(0, 199)}")
            labels.append(1.0 if op == want else 0.0)
        out.append((f"use {want} in problem {rng.randint(0, 999)}\n", steps, labels))
    return out


@pytest.fixture(scope="module")
def trained():
    model, stats = train_prm(toy_examples(256, 0), PRMConfig(**SMALL, steps=200, batch_size=16, lr=3e-3, seed=0))
    return model, stats


def test_prm_beats_chance_on_held_out_data(trained):
    model, stats = trained
    held = toy_examples(128, 1)
    ev = evaluate_prm(model, held)
    assert ev["steps"] > 250
    assert ev["balanced_accuracy"] >= 0.85  # chance: 0.5
    assert stats["final_loss"] < stats["first_loss"]
    assert 0.3 < stats["positive_fraction"] < 0.7


def test_prm_training_is_deterministic_for_a_seed():
    cfg = PRMConfig(**SMALL, steps=5, batch_size=8, seed=3)
    a, _ = train_prm(toy_examples(32, 5), cfg)
    b, _ = train_prm(toy_examples(32, 5), cfg)
    ex = [(p, s) for p, s, _ in toy_examples(8, 6)]
    for x, y in zip(a.score(ex), b.score(ex)):
        assert torch.equal(x, y)


def test_prm_save_load_roundtrip_gives_identical_scores(trained, tmp_path):
    model, stats = trained
    out = save_prm(model, tmp_path / "prm", stats=stats)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "creditflow-prm" and meta["prm"]["hidden_size"] == 32
    loaded = load_prm(out)
    ex = [(p, s) for p, s, _ in toy_examples(16, 2)]
    for x, y in zip(model.score(ex), loaded.score(ex)):
        assert torch.equal(x, y)
    # saving again over an existing directory replaces it
    save_prm(loaded, out)
    assert torch.equal(load_prm(out).score(ex[:1])[0], model.score(ex[:1])[0])
    with pytest.raises(FileNotFoundError, match="credit.prm_path"):
        load_prm(tmp_path / "missing")


def test_prm_scores_at_each_steps_last_token_and_truncation():
    cfg = PRMConfig(**SMALL, max_length=12)
    model = build_prm(cfg, corpus_texts=["use + in problem 1\n1+2=3\n"] * 4)
    (ids, ends), = model.encode([("p\n", ["1+2=3", "3"])])
    nl = model.tokenizer.encode("\n", add_special_tokens=False)[0]
    assert len(ends) == 2 and min(ends) >= 0 and ends[1] == len(ids) - 1
    assert all(ids[e] == nl for e in ends)
    long_steps = ["1+2=3"] * 10
    (_, ends_long), = model.encode([("p\n", long_steps)])
    assert ends_long[0] >= 0 and ends_long[-1] == -1
    s = model.score([("p\n", long_steps)])[0]
    assert s.shape == (10,) and math.isfinite(float(s[0])) and math.isnan(float(s[-1]))


def test_prm_rejects_malformed_examples():
    with pytest.raises(ValueError, match="2 steps but 1 labels"):
        train_prm([("p\n", ["a", "b"], [1.0])], PRMConfig(**SMALL, steps=1))
    with pytest.raises(ValueError, match="labels\\[0\\] must be in \\[0, 1\\]"):
        train_prm([("p\n", ["a"], [2.0])], PRMConfig(**SMALL, steps=1))
    with pytest.raises(ValueError, match="no labelled steps"):
        train_prm([], PRMConfig(**SMALL, steps=1))


def test_examples_from_trajectories_use_procedural_step_checks():
    def tr(flags, success):
        turns = [Turn(index=k, action_span=(k, k + 1), obs_span=(k + 1, k + 1), action_text=f"s{k}\n", observation="",
                      info={} if f is None else {"step_correct": f}) for k, f in enumerate(flags)]
        n = len(flags)
        return Trajectory(uid="u", group_id=0, task_id="t", env_name="math", prompt_ids=[1], response_ids=list(range(n)),
                          policy_mask=[True] * n, logprobs=[0.0] * n, entropies=[0.0] * n, turns=turns,
                          success=success, reward=float(success), prompt_text="q\n")

    ex = examples_from_trajectories([tr([True, False, None], False), tr([True, None], True)])
    assert ex == [("q\n", ["s0\n", "s1\n", "s2\n"], [1.0, 0.0, 0.0]), ("q\n", ["s0\n", "s1\n"], [1.0, 1.0])]


def test_cli_unknown_family_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "--env", "no-such-family", "--out", str(tmp_path / "prm"), "--steps", "1"])
    assert rc == 2
    assert "unknown env 'no-such-family'" in capsys.readouterr().err


def test_reference_examples_are_labelled_by_the_familys_step_checks():
    import environments.tasks  # noqa: F401  (registers the built-in families)
    from environments.registry import family_names, get_family_class
    from stages.reward.prm import reference_examples

    if "math" not in family_names():
        pytest.skip("math task family not available")
    cls = get_family_class("math")
    family = cls(cls.Config())
    ex = reference_examples(family, family.instances("train", 6, 0), seed=0)
    assert ex
    refs = ex[0::2]  # the reference solution, then its corrupted copy, per instance
    assert all(all(v == 1.0 for v in labels) for _, _, labels in refs)
    assert any(0.0 in labels for _, _, labels in ex)
    assert all(len(steps) == len(labels) for _, steps, labels in ex)


def test_collected_episodes_use_the_familys_experiment_rollout_settings(shared_home, monkeypatch):
    """``creditflow prm train --env math`` plays episodes with configs/experiment/math.yaml's rollout
    settings (16 tokens per turn: a step line does not fit the default 4), as a training run would."""
    import stages.rollout.warmup as warmup_mod

    seen = []
    real = warmup_mod.play_instances

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cfg"))
        return real(*args, **kwargs)

    monkeypatch.setattr(warmup_mod, "play_instances", spy)
    examples, tok = collect_examples("math", 4, 0, home=shared_home, with_reference=False)
    assert seen and all(c is not None and c.max_new_tokens_per_turn == 16 and c.max_context_tokens == 256 for c in seen)
    assert examples and all(len(steps) == len(labels) for _, steps, labels in examples)
    # steps longer than the default 4-token turn are played whole
    assert max(len(tok(s, add_special_tokens=False)["input_ids"]) for _, steps, _ in examples for s in steps) > 4
