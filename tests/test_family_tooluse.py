"""Tool-use task family: the shipped world, BM25, questions and splits, tools, answer checking,
sandbox files and faults, garbage actions, snapshot/restore (with files), one pipeline iteration."""

from __future__ import annotations

import json

import pytest

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.registry import get_family_class
from environments.sandbox import ProcessBackend, SandboxConfig
from environments.tasks.tooluse import ToolUseConfig, ToolUseFamily
from environments.tasks.tooluse_world import (
    BM25,
    WORLD_FILE,
    all_questions,
    check_answer,
    generate_world,
    question_split,
)
from stages.credit.decision_tree import TaskProfile


@pytest.fixture
def backend(tmp_path):
    b = ProcessBackend(SandboxConfig(), base_dir=str(tmp_path / "sbx"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def fam():
    return ToolUseFamily(ToolUseConfig())


def test_shipped_world_is_the_generated_one(fam):
    assert json.loads(WORLD_FILE.read_text()) == json.loads(json.dumps(generate_world(0)))
    assert get_family_class("tooluse") is ToolUseFamily and fam.needs_sandbox
    TaskProfile.from_dict(fam.profile())
    ids = [d["id"] for d in fam.world["documents"]]
    assert len(ids) == len(set(ids))
    for q in all_questions(fam.world):  # supporting documents exist and mention the gold answer's hop
        assert set(q["supporting_docs"]) <= set(ids)


def test_bm25_finds_entity_documents(fam):
    idx = BM25(fam.world["documents"])
    for d in fam.world["documents"]:
        assert idx.search(d["title"], 3)[0]["id"] == d["id"] or d["title"] in idx.search(d["title"], 3)[0]["text"]
    assert idx.search("zzzz qqqq", 3) == []


def test_instances_deterministic_and_disjoint(fam):
    a = fam.instances("train", 80, 5)
    assert [i.spec for i in a] == [i.spec for i in ToolUseFamily(ToolUseConfig()).instances("train", 80, 5)]
    e = fam.instances("eval", 40, 5)
    assert {i.spec["question"] for i in a}.isdisjoint({i.spec["question"] for i in e})
    assert all(question_split(i.spec["question"]) == "eval" for i in e)
    only = ToolUseFamily(ToolUseConfig(question_types="founder_country"))
    assert {i.spec["type"] for i in only.instances("train", 10, 0)} == {"founder_country"}
    with pytest.raises(ValueError, match="question_types"):
        ToolUseFamily(ToolUseConfig(question_types="weather"))


@pytest.mark.parametrize("text,gold,numeric,ok", [
    ("Norvenland", "Norvenland", False, True), ("answer: the norvenland.", "Norvenland", False, True),
    ("NORVEN LAND", "Norvenland", False, True), ("Norven", "Norvenland", False, False), ("", "Kara", False, False),
    ("1,200", "1200", True, True), ("x = 1200.", "1200", True, True), ("1200 employees", "1200", True, True),
    ("1201", "1200", True, False), ("twelve hundred", "1200", True, False), ("\udcff", "Kara", False, False),
])
def test_answer_checking(text, gold, numeric, ok):
    assert check_answer(text, gold, numeric) is ok


def _solve(fam, inst):
    """A scripted agent: search the question, then every supporting document's title, then answer."""
    titles = {d["id"]: d["title"] for d in fam.world["documents"]}
    acts = [f"search {titles[i]}\n" for i in inst.spec["supporting_docs"]]
    return acts[: fam.cfg.max_steps - 1] + [f"answer {inst.spec['answer']}\n"]


def test_episode_with_tools_in_the_sandbox(fam, backend):
    inst = next(i for i in fam.instances("train", 50, 0) if i.spec["type"] == "founder_country")
    env = fam.make(inst, backend.create())
    prompt = env.reset()
    assert prompt.startswith("Tools: search") and prompt.endswith(f"Question: {inst.spec['question']}\n")
    r = env.step("search " + fam.world["documents"][0]["title"] + "\n")
    assert r.observation.startswith("[") and r.observation.endswith("\n") and len(r.observation) <= fam.cfg.obs_chars + 1
    assert r.info["tool"] == "search" and r.info["retrieved"]
    assert env.step("calc (3+4)*2/4\n").observation == "7/2\n"
    assert env.step("calc import os\n").observation == "error: cannot compute\n"
    assert env.step("write notes.txt founder first\n").observation.startswith("ok: wrote 13 chars")
    assert env.box.read_file("notes.txt") == b"founder first"  # really in the sandbox work dir
    r = env.step("read notes.txt\n")
    assert r.observation == "founder first\n" and not r.done
    r = env.step("answer " + inst.spec["answer"] + "\n")
    assert r.done and r.success and r.reason == "success" and r.info["terminal_reward"] == 1.0
    st = env.stats()
    assert st["sandbox_file_ops"] == 2 and st["sandbox_seconds"] > 0
    assert env.privileged() == {"supporting_docs": inst.spec["supporting_docs"], "answer": inst.spec["answer"],
                                "question_type": "founder_country"}


def test_scripted_agent_solves_every_question_type(fam):
    seen = set()
    for inst in fam.instances("train", 130, 0):
        env = fam.make(inst)
        env.reset()
        for a in _solve(fam, inst):
            r = env.step(a)
        assert r.success, inst.spec
        seen.add(inst.spec["type"])
    assert len(seen) == 7


def test_bad_files_wrong_answer_and_max_turns(fam, backend):
    inst = fam.instances("train", 1, 0)[0]
    env = fam.make(inst, backend.create())
    env.reset()
    assert env.step("read ../../etc/passwd\n").observation.startswith("error: bad file name")
    assert env.step("read nothere.txt\n").observation == "error: no file nothere.txt\n"
    assert env.step("write /abs x\n").observation.startswith("error: bad file name")
    r = env.step("answer definitely-wrong\n")
    assert r.done and r.reason == "wrong_answer" and r.observation == "done: wrong"
    env = fam.make(inst, backend.create())
    env.reset()
    for k in range(fam.cfg.max_steps):
        r = env.step("search something\n")
    assert r.done and r.reason == "max_turns" and r.observation.endswith("done: no answer")


def test_sandbox_fault_and_garbage(fam, backend):
    inst = fam.instances("train", 1, 0)[0]
    box = backend.create()
    env = fam.make(inst, box)
    env.reset()
    box.close()
    r = env.step("write notes.txt hi\n")
    assert r.done and r.reason == "sandbox_error" and r.info["terminal_reward"] == 0.0
    env = fam.make(inst, backend.create())
    env.reset()
    for g in ["\udcff\udcfe\n", "\x00\n", "", "search\n", "calc " + "(" * 500 + "\n", b"\xff search x\n", None,
              "write " + "a" * 100 + " x\n", "read\n"]:
        r = env.step(g)  # type: ignore[arg-type]
        if r.done:
            assert r.reason == "max_turns"
            env.reset()


def test_snapshot_restore_with_files(fam, backend):
    inst = fam.instances("train", 1, 0)[0]
    env = fam.make(inst, backend.create())
    env.reset()
    env.step("write a.txt first note\n")
    env.step("search " + inst.spec["question"] + "\n")
    snap = env.snapshot()
    key = env.state_key()
    tail = ["write b.txt second\n", "read a.txt\n", "answer " + inst.spec["answer"] + "\n"]
    first = [env.step(a) for a in tail]
    other = fam.make(inst, backend.create())  # a different sandbox
    other.reset()
    other.restore(snap)
    assert other.state_key() == key and other.box.read_file("a.txt") == b"first note"
    assert [other.step(a) for a in tail] == first
    env.restore(snap)  # the same env: b.txt (written after the snapshot) is gone again
    assert env.step("read b.txt\n").observation == "error: no file b.txt\n"


def test_warmup_corpus(fam):
    corpus = fam.warmup_corpus(100, 0)
    assert corpus == fam.warmup_corpus(100, 0)
    right = 0
    for prompt, turns in corpus:
        assert prompt.startswith("Tools:")
        assert all(a.split(" ")[0] in ("search", "calc", "write", "read") for a, _ in turns[:-1])
        assert turns[-1][0].startswith("answer ")
        right += turns[-1][1] == "done: correct"
    assert right < 30


def test_one_pipeline_iteration(tmp_path):
    from flows.api import run_plain

    out = run_plain(["experiment=tooluse", "iterations=1", "rollout.tasks_per_iteration=2", "rollout.group_size=2",
                     "eval_episodes=2", "model.warmup_steps=3", "env.max_steps=3"], home=tmp_path)
    assert 0.0 <= out["success_after"] <= 1.0
    assert list((tmp_path / "runs" / out["run_id"] / "sandboxes").rglob("*")) == []
