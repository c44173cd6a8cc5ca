"""Code task family: problems and splits, hidden tests in the process sandbox, feedback between
attempts, rewards, sandbox faults, garbage bodies, snapshots, and one pipeline iteration."""

from __future__ import annotations

import pytest

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.registry import get_family_class
from environments.sandbox import ProcessBackend, SandboxConfig
from environments.tasks import code_harness
from environments.tasks.code import CodeConfig, CodeFamily, all_problems, feedback_line, problem_split
from stages.credit.decision_tree import TaskProfile


@pytest.fixture
def backend(tmp_path):
    b = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path / "sbx"))
    yield b
    b.close()


def _family(**kw) -> CodeFamily:
    return CodeFamily(CodeConfig(**kw))


def test_registered_profile_and_problem_space():
    assert get_family_class("code") is CodeFamily
    fam = _family()
    assert fam.needs_sandbox
    TaskProfile.from_dict(fam.profile())
    TaskProfile.from_dict(_family(max_attempts=3).profile())
    assert _family(max_attempts=3).profile()["setting"] == "agentic"
    probs = all_problems()
    assert 40 <= len(probs) <= 100 and len({p["key"] for p in probs}) == len(probs)
    assert fam.problems["train"] and fam.problems["eval"]
    assert {p["key"] for p in fam.problems["train"]}.isdisjoint(p["key"] for p in fam.problems["eval"])
    for p in probs:  # each reference body passes its own tests
        inst_tests = fam._tests(p, __import__("random").Random(1))
        assert code_harness.run_tests(p["params"], p["reference_body"], inst_tests)["passed"] == len(inst_tests)


def test_instances_deterministic_and_disjoint():
    fam = _family()
    a = fam.instances("train", 50, seed=1)
    assert [i.spec for i in a] == [i.spec for i in _family().instances("train", 50, seed=1)]
    assert [i.spec for i in a] != [i.spec for i in fam.instances("train", 50, seed=2)]
    e = fam.instances("eval", 30, seed=1)
    assert {i.spec["key"] for i in a}.isdisjoint({i.spec["key"] for i in e})
    assert all(problem_split(i.spec["key"]) == "eval" for i in e)
    assert all(len(i.spec["tests"]) == 5 for i in a + e)


def test_single_attempt_pass_and_fail(backend):
    fam = _family()
    inst = fam.instances("train", 1, 0)[0]
    env = fam.make(inst, backend.create())
    prompt = env.reset()
    assert prompt.startswith("Write the body of f as one line.\ndef f(") and prompt.endswith('"""\n')
    r = env.step(inst.spec["reference_body"] + "\n")
    assert r.done and r.success and r.reason == "success" and r.info["terminal_reward"] == 1.0
    assert r.info["passed"] == r.info["total"] == 5
    env = fam.make(inst, backend.create())
    env.reset()
    r = env.step("return None\n")
    assert r.done and not r.success and r.reason == "tests_failed" and r.reward == 0.0
    assert r.observation.startswith("# 5/5 failed: f(") and r.observation.endswith("done: failure")
    st = env.stats()
    assert st["sandbox_execs"] == 1 and st["sandbox_seconds"] > 0 and st["env_resets"] == 1
    assert env.privileged()["reference_body"] == inst.spec["reference_body"]
    # a bare expression gets `return` in front
    env = fam.make(inst, backend.create())
    env.reset()
    assert env.step(inst.spec["reference_body"].replace("return ", "", 1) + "\n").success


def test_partial_credit_and_multi_attempt_feedback(backend):
    fam = _family(max_attempts=3, partial_credit=True)
    inst = next(i for i in fam.instances("train", 40, 0) if i.spec["template"] == "max2")
    env = fam.make(inst, backend.create())
    env.reset()
    r0 = env.step("return a\n")
    assert not r0.done and r0.observation.startswith("# ") and "failed: f(" in r0.observation and "expected" in r0.observation
    assert r0.observation.endswith("\n") and len(r0.observation) <= fam.cfg.feedback_chars + 1
    r1 = env.step("return b\n")
    assert not r1.done
    r2 = env.step("return a\n")  # last attempt, partial credit = fraction passed
    assert r2.done and r2.reason == "tests_failed"
    assert r2.info["terminal_reward"] == pytest.approx(r2.info["passed"] / 5)
    env = fam.make(inst, backend.create())
    env.reset()
    env.step("return a\n")
    assert env.step("return max(a, b)\n").success  # revised on the second attempt


def test_feedback_line_formats():
    assert feedback_line({"passed": 5, "total": 5}, 80) == "# 5/5 passed"
    s = feedback_line({"passed": 3, "total": 5, "failures": [{"call": "f(1, 2)", "expected": "2", "got": "1"}]}, 80)
    assert s == "# 2/5 failed: f(1, 2) expected 2 got 1"
    assert feedback_line({"passed": 0, "total": 5, "error": "SyntaxError: x"}, 10) == "# error..."


def test_sandbox_faults_end_the_episode(backend):
    fam = _family(max_attempts=3, exec_timeout_s=1.0)
    inst = fam.instances("train", 1, 0)[0]
    env = fam.make(inst, backend.create())
    env.reset()
    r = env.step("while True: pass\n")
    assert r.done and r.reason == "sandbox_timeout" and r.reward == 0.0 and r.info["terminal_reward"] == 0.0
    # a closed (broken) sandbox is a fault too, never an exception
    box = backend.create()
    env = fam.make(inst, box)
    env.reset()
    box.close()
    r = env.step("return 1\n")
    assert r.done and r.reason == "sandbox_error"


def test_garbage_bodies_never_crash(backend):
    fam = _family(max_attempts=12)
    inst = fam.instances("train", 1, 0)[0]
    env = fam.make(inst, backend.create())
    env.reset()
    for g in ["\udcff\udcfe\n", "\x00\x01\n", "", "return (((\n", "import os; os._exit(0)\n",
              "raise SystemExit\n", "return __import__('sys').exit(3)\n", b"\xff\xfe\n", None,
              "return print('CFRESULT 0 {\"passed\": 5, \"total\": 5}')\n", "x" * 5000 + "\n"]:
        r = env.step(g)  # type: ignore[arg-type]
        assert not r.success and r.reason in ("", "tests_failed"), (g, r)
        if r.done:
            break


def test_snapshot_restore(backend):
    fam = _family(max_attempts=3)
    inst = fam.instances("train", 1, 0)[0]
    env = fam.make(inst, backend.create())
    env.reset()
    env.step("return 0\n")
    snap = env.snapshot()
    a = env.step(inst.spec["reference_body"] + "\n")
    other = fam.make(inst, backend.create())
    other.reset()
    other.restore(snap)
    b = other.step(inst.spec["reference_body"] + "\n")
    assert a == b


def test_warmup_corpus_teaches_format_not_answers():
    fam = _family(max_attempts=2)
    corpus = fam.warmup_corpus(100, 0)
    assert corpus == fam.warmup_corpus(100, 0)
    refs = {p["reference_body"] for p in all_problems()}
    for prompt, turns in corpus:
        for action, obs in turns:
            assert action.startswith("return ") and action.endswith("\n") and action.strip() in refs
            assert obs.startswith("# ")
        assert turns[-1][1].endswith(("done: success", "done: failure"))
    successes = sum(t[-1][1].endswith("done: success") for _, t in corpus)
    assert successes < 15


def test_one_pipeline_iteration(tmp_path):
    from flows.api import run_plain

    out = run_plain(["experiment=code", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=2",
                     "eval_episodes=2", "model.warmup_steps=3"], home=tmp_path)
    assert 0.0 <= out["success_after"] <= 1.0
    run_dir = tmp_path / "runs" / out["run_id"]
    assert list((run_dir / "sandboxes").rglob("*")) == []
