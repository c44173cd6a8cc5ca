"""Math task family: instances and splits, the exact step checker and answer parser, the text
protocol, per-step ground truth, snapshots, garbage actions, and one pipeline iteration."""

from __future__ import annotations

from fractions import Fraction

import pytest

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.registry import get_family_class
from environments.tasks.math import MathConfig, MathFamily
from environments.tasks.math_checker import check_step, evaluate, format_number, parse_answer
from environments.tasks.math_problems import problem_split
from stages.credit.decision_tree import TaskProfile


def _family(**kw) -> MathFamily:
    return MathFamily(MathConfig(**kw))


def _play(env, lines):
    env.reset()
    out = []
    for line in lines:
        out.append(env.step(line))
        if out[-1].done:
            break
    return out


def test_registered_and_profile_valid():
    assert get_family_class("math") is MathFamily
    fam = _family()
    TaskProfile.from_dict(fam.profile())
    d = fam.describe()
    for key in ("source", "size", "filtering", "metric"):
        assert d[key]


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_instances_deterministic_disjoint_and_reference_solutions_check(difficulty):
    fam = _family(difficulty=difficulty)
    train = fam.instances("train", 60, seed=3)
    assert [i.spec for i in train] == [i.spec for i in _family(difficulty=difficulty).instances("train", 60, seed=3)]
    assert [i.spec for i in train] != [i.spec for i in fam.instances("train", 60, seed=4)]
    evals = fam.instances("eval", 60, seed=3)
    assert not {i.spec["problem"] for i in train} & {i.spec["problem"] for i in evals}
    assert all(problem_split(i.spec["problem"]) == "train" for i in train)
    assert len({i.task_id for i in train + evals}) == 120
    for inst in train + evals:
        sol = Fraction(inst.spec["answer"]) if inst.spec["kind"] == "linear" else None
        assert all(check_step(s, sol) for s in inst.spec["steps"]), inst.spec
        # the reference solution played through the environment succeeds
        env = fam.make(inst)
        res = _play(env, [s + "\n" for s in inst.spec["steps"][: fam.cfg.max_steps - 1]] + [f"answer {inst.spec['answer']}\n"])
        if len(inst.spec["steps"]) < fam.cfg.max_steps:
            assert res[-1].success and res[-1].reason == "success"
    with pytest.raises(ValueError):
        fam.instances("test", 1, 0)


def test_all_kinds_generated():
    kinds = {i.spec["kind"] for i in _family().instances("train", 60, 0)}
    assert kinds == {"arith", "linear", "word"}
    assert {i.spec["kind"] for i in _family(kinds="word").instances("train", 10, 0)} == {"word"}
    with pytest.raises(ValueError, match="env.kinds"):
        _family(kinds="geometry")
    with pytest.raises(ValueError, match="env.difficulty"):
        _family(difficulty=9)


@pytest.mark.parametrize(
    "text,value",
    [
        ("answer 14", 14), ("answer: 14", 14), ("Answer 14.", 14), ("answer  14 \n", 14), ("answer x=5", 5),
        ("answer x = -5", -5), ("answer 3/4", Fraction(3, 4)), ("answer -3/4", Fraction(-3, 4)),
        ("answer 0.75", Fraction(3, 4)), ("answer .5", Fraction(1, 2)), ("answer 2 1/2", Fraction(5, 2)),
        ("answer 1,000", 1000), ("answer $14", 14), ("answer 14 apples", 14), ("answer \\boxed{7}", 7),
        ("answer \\frac{3}{4}", Fraction(3, 4)), ("answer 6/8", Fraction(3, 4)), ("answer 4.0", 4),
        ("answer −2", -2),
    ],
)
def test_answer_formats(text, value):
    assert parse_answer(text) == Fraction(value)


@pytest.mark.parametrize("text", ["answer", "answer 3+4", "answer abc", "answer 1/0", "answer 14 or 15",
                                  "answer \ufffd\ufffd", "answer " + "9" * 300, "answer 1/2/3"])
def test_answer_rejects(text):
    assert parse_answer(text) is None


@pytest.mark.parametrize(
    "line,ok",
    [
        ("3+4=7", True), ("3 + 4 = 7.", True), ("7*2=14", True), ("7×2=14", True), ("15÷3=5", True),
        ("2(3+1)=8", True), ("-3*2=-6", True), ("1/2+1/4=3/4", True), ("0.5*4=2", True), ("3+4=7=7", True),
        ("3+4=8", False), ("7*2=15", False), ("3+4", False), ("", False), ("hello", False), ("1/0=1", False),
        ("3x=15", False), ("2**3=8", False), ("\ufffd\ufffd=1", False), ("9" * 250 + "=1", False),
        ("(" * 40 + "1" + ")" * 40 + "=1", False),
    ],
)
def test_step_checker(line, ok):
    assert check_step(line) is ok


def test_step_checker_with_x_on_linear_problems():
    assert check_step("3x=15", Fraction(5)) and check_step("3x+5=20", Fraction(5))
    assert not check_step("3x=14", Fraction(5))
    assert not check_step("x*x=25", Fraction(5))  # not linear: unparsable
    assert not check_step("3x=15")  # x is not allowed outside linear problems
    assert evaluate("(1+2)*3/4") == Fraction(9, 4)
    assert format_number(Fraction(-15, 4)) == "-15/4"


def _instance(fam, kind="arith"):
    return next(i for i in fam.instances("train", 200, 0) if i.spec["kind"] == kind and len(i.spec["steps"]) == 1)


def test_protocol_step_checks_and_ground_truth():
    fam = _family(max_steps=5, step_reward=0.25)
    inst = _instance(fam, "word")
    env = fam.make(inst)
    prompt = env.reset()
    assert prompt == inst.spec["problem"] + "\n"
    good = inst.spec["steps"][0]
    r0 = env.step("1+1=3\n")  # wrong arithmetic: first incorrect step
    r1 = env.step(good + "\n")
    r2 = env.step("not a step\n")
    assert [r.info["step_correct"] for r in (r0, r1, r2)] == [False, True, False]
    assert [r.observation for r in (r0, r1, r2)] == ["", "", ""]
    assert (r0.reward, r1.reward, r2.reward) == (0.0, 0.25, 0.0)
    assert r0.action is None and r1.action == good
    r3 = env.step(f"answer {inst.spec['answer']}\n")
    assert r3.done and r3.success and r3.reason == "success" and r3.info["terminal_reward"] == 1.0
    assert r3.observation == "done: correct" and r3.info["is_answer"] and r3.info["step_correct"]
    gt = env.ground_truth([None, good, None, "answer"])
    assert gt.advantage == [-1.0, 1.0, -1.0, 1.0] and gt.q_value == gt.advantage and gt.value == [0.0] * 4
    assert gt.decisive == [True, False, False, False] and gt.reference_policy == "step-check"
    assert env.privileged() == {"answer": inst.spec["answer"], "reference_steps": inst.spec["steps"], "kind": "word"}

    # all steps right, answer wrong: the answer turn is decisive
    env = fam.make(inst)
    res = _play(env, [good + "\n", "answer 99999\n"])
    assert res[-1].reason == "wrong_answer" and res[-1].info["terminal_reward"] == 0.0 and not res[-1].success
    assert env.ground_truth([good, None]).decisive == [False, True]
    # a correct solution has no decisive turn
    env = fam.make(inst)
    _play(env, [good + "\n", f"answer {inst.spec['answer']}\n"])
    assert env.ground_truth([good, "answer"]).decisive == [False, False]


def test_max_turns_and_cut_actions():
    fam = _family(max_steps=3)
    inst = _instance(fam)
    env = fam.make(inst)
    res = _play(env, ["1+1=2\n", "2+2=4", "3+3=6\n", "answer 1\n"])
    assert len(res) == 3 and res[-1].done and res[-1].reason == "max_turns"
    assert res[1].observation == "\n"  # the action was cut before its newline
    assert res[-1].info["terminal_reward"] == 0.0 and res[-1].observation == "done: no answer"
    gt = env.ground_truth([None] * 3)
    assert gt.decisive == [False, False, True] and gt.advantage == [1.0, 1.0, 1.0]
    with pytest.raises(RuntimeError):
        env.step("1+1=2\n")


def test_garbage_and_invalid_utf8_never_crash():
    fam = _family(max_steps=8)
    inst = _instance(fam)
    garbage = ["\udcff\udcfe\n", "\x00\x01\x02\n", "�" * 50 + "\n", "answer \udcff\n", "=" * 500 + "\n",
               "(" * 1000 + "\n", "9" * 5000 + "*9=1\n", b"\xff\xfe answer 3\n", None]
    env = fam.make(inst)
    env.reset()
    for g in garbage:
        r = env.step(g)  # type: ignore[arg-type]
        assert r.info["step_correct"] is False
        if r.done:
            assert r.reason in ("wrong_answer", "max_turns")
            env.reset()


def test_snapshot_restore_equivalence():
    fam = _family(max_steps=6)
    inst = _instance(fam)
    env = fam.make(inst)
    env.reset()
    env.step("1+1=2\n")
    env.step("2*3=7\n")
    snap = env.snapshot()
    key = env.state_key()
    tail = ["5-1=4\n", f"answer {inst.spec['answer']}\n"]
    first = [env.step(a) for a in tail]
    gt_first = env.ground_truth([None] * 4)
    other = fam.make(inst)
    other.reset()
    other.restore(snap)
    assert other.state_key() == key
    second = [other.step(a) for a in tail]
    assert first == second
    assert other.ground_truth([None] * 4) == gt_first
    env.restore(snap)  # restore into the same env after it finished
    assert [env.step(a) for a in tail] == first
    assert env.stats()["env_resets"] >= 2


def test_warmup_corpus_teaches_format_not_answers():
    fam = _family(max_steps=4)
    corpus = fam.warmup_corpus(200, seed=0)
    assert len(corpus) == 200
    assert corpus == fam.warmup_corpus(200, seed=0)
    right = 0
    for prompt, turns in corpus:
        *steps, (last, obs) = turns
        assert last.startswith("answer ") and last.endswith("\n") and obs.startswith("done: ")
        assert all(check_step(a) and o == "" for a, o in steps)  # every step line is true arithmetic
        right += obs == "done: correct"
    assert right / len(corpus) < 0.35  # answers are right by chance only


def test_one_pipeline_iteration(tmp_path):
    from flows.api import run_plain

    out = run_plain(["experiment=math", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=2",
                     "eval_episodes=2", "model.warmup_steps=3"], home=tmp_path)
    assert 0.0 <= out["success_before"] <= 1.0 and 0.0 <= out["success_after"] <= 1.0
    assert set(out["per_stage"]) >= {"env", "rollout", "reward", "credit", "update"}
