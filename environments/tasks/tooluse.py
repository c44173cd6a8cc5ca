"""Multi-hop question answering with tools over a small fictional world (survey §5, §8.2).

The world (people, cities, countries, companies with attributes) is generated deterministically
by :func:`~environments.tasks.tooluse_world.generate_world` and shipped as ``environments/data/tooluse_world.json`` (the shipped
file equals ``generate_world(0)``; a test checks it). Every entity has one short document; a
question needs 2–3 of them (e.g. "In which country was the founder of Brightline born?": the
company's document names the founder, the founder's names the birth city, the city's names the
country), some also need arithmetic ("How many employees do A and B have together?").

Tools (one per turn; the policy's action is one line ending with ``"\\n"``)
------------------------------------------------------------------------
* ``search <query>`` — BM25 (:class:`~environments.tasks.tooluse_world.BM25`, written here) over the documents' titles and texts;
  returns the top ``search_k`` documents as ``[id] text`` lines.
* ``calc <expr>`` — exact arithmetic (the math family's safe parser: numbers, ``+ - * /``,
  parentheses; no names, no ``eval``).
* ``write <path> <text>`` / ``read <path>`` — files in the sandbox work directory (notes).
  Paths are ``[A-Za-z0-9_.-]`` names (no directories), text at most ``max_write_chars``,
  at most ``max_files`` files. Without a sandbox (``make(..., sandbox=None)``: the warm-up corpus,
  unit tests) the same files live in the environment's memory only.
* ``answer <text>`` — ends the episode. Names are compared case-, space- and
  punctuation-insensitively (a leading "the" ignored); numbers exactly (the math family's
  :func:`~environments.tasks.math_checker.parse_answer`: ``1,200``, ``1200.``, ``x=1200`` all fine).

Anything else (unknown tool, empty line, garbage, invalid UTF-8 decoded to U+FFFD) gets the
observation ``"error: unknown tool ..."`` and uses up the turn (``StepResult.action`` None).

Observations: the tool output truncated to ``obs_chars`` characters, then ``"\\n"`` (so the next
action starts on a fresh line; prefixed with ``"\\n"`` when the action did not end with one).
The final observation is ``"done: correct"`` / ``"done: wrong"`` / ``"done: no answer"``.

Episode end: the answer turn (reasons ``success`` / ``wrong_answer``), or ``max_steps`` turns
(``max_turns``), or a sandbox fault (a sandbox operation failing for a reason other than a bad
path / missing file: ``sandbox_error``; the sandbox interface's ``ExecResult.reason`` does not
arise: this family never execs). Terminal reward 1.0 iff the answer is right. Turn rewards:
``search_reward`` per supporting document a search surfaces for the first time (default 0).
``info["verifiable"]`` is true on search turns (the retrieved ids are checked against the gold
supporting documents: the turn reward is exact) and on the answer turn (the answer checker).

Training-time information: ``privileged() = {"supporting_docs": [ids], "answer": gold, "question_type": ...}``;
``StepResult.info["retrieved"]`` lists the ids a search returned and ``info["new_supporting"]``
how many supporting documents it surfaced for the first time (information-gain style credit).
State keys: ``"{task_id}|t={t}|seen={hash of supporting docs seen}|files={hash}"``.

Snapshots are pure Python: the written files are part of the environment state, and
:meth:`ToolUseEnv.restore` resets the sandbox (back to its creation state) and writes them back,
so a snapshot can be restored into any environment of the same instance, with any backend.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Optional

from environments.base import (
    SPLITS,
    EnvConfig,
    Environment,
    StepResult,
    TaskFamily,
    TaskInstance,
    as_action_text,
    derive_seed,
    require_spec,
)
from environments.registry import register_family
from environments.tasks.math_checker import ParseError, evaluate, format_number
from environments.tasks.tooluse_world import (
    BM25,
    EVAL_SHARE,
    QUESTION_TYPES,
    search_terms,
    all_questions,
    check_answer,
    load_world,
    question_split,
)
from stages.config_fields import param

TOOLS = ("search", "calc", "read", "write", "answer")
_PATH_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
#: exceptions of a sandbox's read_file/write_file that mean "bad path / no such file", not a fault
_TOOL_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError, KeyError,
                UnicodeError)


def _question_types_problem(value: str) -> Optional[str]:
    """The rule of ``env.question_types`` when ``value`` breaks it (QUESTION_TYPES is defined below)."""
    types = [t.strip() for t in str(value).split(",") if t.strip()]
    if value == "all" or (types and all(t in QUESTION_TYPES for t in types)):
        return None
    return f"must be all or a comma-separated subset of {', '.join(QUESTION_TYPES)}"


@dataclass
class ToolUseConfig(EnvConfig):
    """Keys allowed under ``env.`` for the tooluse family."""

    name: str = param("tooluse", help="task family (registry name)")
    world: str = param("", help="path of a world JSON (see generate_world); \"\" = the shipped environments/data/tooluse_world.json")
    question_types: str = param("all", help="comma-separated question types (see QUESTION_TYPES) or \"all\"", check=lambda v: _question_types_problem(v), rule="must be all or a comma-separated subset of the QUESTION_TYPES")
    max_steps: int = param(6, help="turns per episode at most, the answer turn included (then reason max_turns)", ge=1)
    search_k: int = param(2, help="documents a search returns", ge=1)
    obs_chars: int = param(240, help="tool outputs are truncated to this many characters", ge=16)
    max_write_chars: int = param(200, help="longest text one write stores", ge=1)
    max_files: int = param(8, help="files an episode may write", ge=1)
    search_reward: float = param(0.0, help="turn reward per supporting document a search surfaces for the first time: the verifiable retrieval reward of search turns (Wei et al. 2025's search-agent turn rewards); 0 = outcome reward only", ge=0)
    train_size: int = param(512, help="train-split instance pool size (cycles through the split's questions)", ge=0)
    eval_size: int = param(128, help="eval-split instance pool size", ge=0)


# ----------------------------------------------------------------------------- environment


class _SandboxFault(Exception):
    pass


class ToolUseEnv(Environment):
    """One episode of a question (protocol in the module docstring)."""

    def __init__(self, cfg: Any, instance: TaskInstance, index: BM25, sandbox: Any = None, episode_seed: int = 0):
        self.cfg, self.instance, self.index, self.box = cfg, instance, index, sandbox
        self.episode_seed = int(episode_seed)
        self.spec = instance.spec
        self.supporting = list(self.spec["supporting_docs"])
        self._resets = 0
        self._sandbox_seconds = 0.0
        self._file_ops = 0
        self._started = False
        self._reset_state()

    def _reset_state(self) -> None:
        self._t = 0
        self._done = False
        self._success = False
        self.files: dict[str, str] = {}
        self.seen: set[str] = set()

    def reset(self) -> str:
        self._started = True
        self._resets += 1
        if self.box is not None and self._resets > 1:
            self._box_call(self.box.reset)
        self._reset_state()
        return ("Tools: search <query> | calc <expr> | read <file> | write <file> <text> | answer <text>\n"
                f"Question: {self.spec['question']}\n")

    def state_key(self) -> str:
        seen = ",".join(sorted(self.seen & set(self.supporting)))
        files = hashlib.blake2b(json.dumps(self.files, sort_keys=True).encode("utf-8", "replace"), digest_size=4)
        end = "|end" if self._done else ""
        return f"{self.instance.task_id}{end}|t={self._t}|seen={seen}|files={files.hexdigest()}"

    # -- sandbox file operations -------------------------------------------------------------

    def _box_call(self, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        except _TOOL_ERRORS:
            raise
        except Exception as exc:  # noqa: BLE001 - any other failure is the sandbox's
            raise _SandboxFault(type(exc).__name__) from exc
        finally:
            self._sandbox_seconds += time.perf_counter() - t0
            self._file_ops += 1

    def _write(self, path: str, text: str) -> str:
        if not _PATH_RE.match(path) or path.startswith("."):
            return f"error: bad file name {path[:40]!r}"
        if path not in self.files and len(self.files) >= int(self.cfg.max_files):
            return f"error: at most {self.cfg.max_files} files"
        text = text[: int(self.cfg.max_write_chars)]
        if self.box is not None:
            try:
                self._box_call(self.box.write_file, path, text.encode("utf-8", "replace"))
            except _TOOL_ERRORS as exc:
                return f"error: cannot write {path}: {type(exc).__name__}"
        self.files[path] = text
        return f"ok: wrote {len(text)} chars to {path}"

    def _read(self, path: str) -> str:
        if not _PATH_RE.match(path) or path.startswith("."):
            return f"error: bad file name {path[:40]!r}"
        if self.box is not None:
            try:
                return self._box_call(self.box.read_file, path).decode("utf-8", "replace") or "(empty file)"
            except _TOOL_ERRORS:
                return f"error: no file {path}"
        if path not in self.files:
            return f"error: no file {path}"
        return self.files[path] or "(empty file)"

    # -- step ----------------------------------------------------------------------------------

    def step(self, action_text: str) -> StepResult:
        self.check_can_step()
        text = as_action_text(action_text)
        line = text.split("\n", 1)[0].strip()
        prefix = "" if text.endswith("\n") else "\n"
        tool, _, arg = line.partition(" ")
        tool, arg = tool.lower().rstrip(":"), arg.strip()
        t = self._t
        self._t += 1
        # verifiable turns (hybrid turn rewards): a search, whose retrieved ids are checked against the
        # gold supporting documents, and the answer, checked by the answer checker (its verdict is the
        # terminal reward); calc / read / write / invalid turns have no check of their usefulness
        info: dict[str, Any] = {"turn": t, "tool": tool if tool in TOOLS else None, "turn_reward": 0.0,
                                "verifiable": tool in ("search", "answer")}
        if tool == "answer":
            ok = check_answer(arg, self.spec["answer"], bool(self.spec["numeric"]))
            info["answer_correct"] = ok
            return self._end(prefix + ("done: correct" if ok else "done: wrong"), "success" if ok else "wrong_answer",
                             line, info)
        action: Optional[str] = line if tool in TOOLS else None
        try:
            out = self._tool(tool, arg, info)
        except _SandboxFault as exc:
            info["sandbox_error"] = str(exc)
            return self._end(prefix + f"error: sandbox fault ({exc})\ndone: failure", "sandbox_error", action, info)
        if tool == "search":
            info["turn_reward"] = float(self.cfg.search_reward) * int(info.get("new_supporting", 0))
        if len(out) > int(self.cfg.obs_chars):
            out = out[: max(int(self.cfg.obs_chars) - 3, 0)] + "..."
        if self._t >= int(self.cfg.max_steps):
            return self._end(prefix + out + "\ndone: no answer", "max_turns", action, info)
        return StepResult(observation=prefix + out + "\n", reward=info["turn_reward"], done=False, action=action,
                          state_key=self.state_key(), info=info)

    def _tool(self, tool: str, arg: str, info: dict[str, Any]) -> str:
        if tool == "search":
            if not arg:
                return "error: search needs a query"
            hits = self.index.search(arg, int(self.cfg.search_k))
            ids = [d["id"] for d in hits]
            new = [i for i in ids if i in self.supporting and i not in self.seen]
            self.seen.update(ids)
            info["retrieved"], info["new_supporting"] = ids, len(new)
            return "\n".join(f"[{d['id']}] {d['text']}" for d in hits) if hits else "no results"
        if tool == "calc":
            try:
                return f"{format_number(evaluate(arg))}"
            except (ParseError, ZeroDivisionError, ValueError, OverflowError, RecursionError):
                return "error: cannot compute"
        if tool == "write":
            path, _, body = arg.partition(" ")
            return self._write(path, body)
        if tool == "read":
            return self._read(arg)
        return "error: unknown tool; use search|calc|read|write|answer"

    def _end(self, obs: str, reason: str, action: Optional[str], info: dict[str, Any]) -> StepResult:
        self._done = True
        self._success = reason == "success"
        info["terminal_reward"] = 1.0 if self._success else 0.0
        return StepResult(observation=obs, reward=info["turn_reward"] + info["terminal_reward"], done=True, action=action,
                          state_key=self.state_key(), success=self._success, reason=reason, info=info)

    @property
    def done(self) -> bool:
        return self._done

    def snapshot(self) -> dict[str, Any]:
        return {"t": self._t, "done": self._done, "success": self._success, "started": self._started,
                "files": dict(self.files), "seen": sorted(self.seen)}

    def restore(self, handle: dict[str, Any]) -> None:
        """Back to ``handle``'s state; the sandbox is reset (to its creation state) and the
        snapshot's files are written back into it."""
        if self.box is not None:
            try:
                self._box_call(self.box.reset)
                for path, text in handle["files"].items():
                    self._box_call(self.box.write_file, path, text.encode("utf-8", "replace"))
            except (_SandboxFault, *_TOOL_ERRORS) as exc:
                raise RuntimeError(f"restore of {self.instance.task_id}: sandbox failed ({exc!r})") from exc
        self._t, self._done, self._success = handle["t"], handle["done"], handle["success"]
        self._started = handle["started"]
        self.files = dict(handle["files"])
        self.seen = set(handle["seen"])
        self._resets += 1

    def stats(self) -> dict[str, float]:
        return {"sandbox_seconds": self._sandbox_seconds, "sandbox_execs": 0.0,
                "sandbox_file_ops": float(self._file_ops), "env_resets": float(max(self._resets, 1))}

    def privileged(self) -> dict[str, Any]:
        return {"supporting_docs": list(self.supporting), "answer": self.spec["answer"],
                "question_type": self.spec["type"]}


# ----------------------------------------------------------------------------- family




#: planning text of a tool call (HICRA, Wang et al. 2025c §3; the plan-execute hierarchy of
#: agentic tasks, survey §5.4): ``search <query>`` chooses the next hop of the multi-hop question
#: (which entity to look up) and ``write <path> <text>`` writes the plan or what was found into
#: notes: they plan. ``calc`` (arithmetic on known numbers), ``read`` (fetching notes) and
#: ``answer`` execute and commit.
PLANNING_PATTERN = r"^\s*(?i:search|write)\b.*"


@register_family
class ToolUseFamily(TaskFamily):
    name = "tooluse"
    privileged_keys = ("supporting_docs", "answer", "question_type")
    Config = ToolUseConfig
    needs_sandbox = True
    planning_pattern = PLANNING_PATTERN

    def __init__(self, cfg: Optional[Any] = None):
        super().__init__(cfg)
        c = self.cfg
        types = QUESTION_TYPES if c.question_types == "all" else tuple(
            t.strip() for t in str(c.question_types).split(",") if t.strip())
        self.world = load_world(c.world)
        self.index = BM25(self.world["documents"])
        qs = [q for q in all_questions(self.world) if q["type"] in types]
        self.questions = {s: [q for q in qs if question_split(q["question"]) == s] for s in SPLITS}

    def instance(self, split: str, index: int, seed: int) -> TaskInstance:
        qs = self.questions[split]
        if not qs:
            raise ValueError(f"no {split} questions for env.question_types={self.cfg.question_types!r}")
        order = list(range(len(qs)))
        random.Random(f"tooluse-order|{split}|{seed}").shuffle(order)
        q = qs[order[index % len(order)]]
        iseed = derive_seed("tooluse-instance", split, seed, index)
        return TaskInstance(task_id=f"tool-{split}-s{seed}-{index}", split=split, seed=iseed, spec=dict(q))

    def make(self, instance: TaskInstance, sandbox: Any = None, episode_seed: int = 0) -> ToolUseEnv:
        require_spec(instance, ("question", "answer", "supporting_docs"), "tooluse")
        return ToolUseEnv(self.cfg, instance, self.index, sandbox=sandbox, episode_seed=episode_seed)

    def describe(self) -> dict[str, str]:
        c = self.cfg
        W = self.world
        sizes = {s: len(v) for s, v in self.questions.items()}
        return {
            "source": (f"fictional world (seed {W.get('seed')}): {len(W['people'])} people, {len(W['cities'])} cities, "
                       f"{len(W['countries'])} countries, {len(W['companies'])} companies, {len(W['documents'])} "
                       f"documents ({c.world or 'shipped environments/data/tooluse_world.json'}); templated "
                       "multi-hop questions"),
            "size": (f"train: {c.train_size} instances over {sizes['train']} questions; eval: {c.eval_size} "
                     f"instances over {sizes['eval']} questions"),
            "filtering": f"questions assigned to a split by hash of their text (1 in {EVAL_SHARE} to eval); disjoint",
            "metric": ("success rate = the 'answer' tool names the gold answer (names: case/punctuation-insensitive; "
                       f"numbers: exact); terminal reward 1.0 else 0.0; at most {c.max_steps} turns"),
            "benchmark": f"tooluse ({c.question_types}; tools search/calc/read/write/answer; BM25 top-{c.search_k})",
            "text_protocol": "one tool call per line ('search founder of X\\n'); observation = tool output + '\\n'",
        }

    def profile(self) -> dict[str, Any]:
        return {
            "setting": "agentic",
            "turns": int(self.cfg.max_steps),
            "trajectory_tokens": 60 + int(self.cfg.max_steps) * (20 + int(self.cfg.obs_chars) // 3),
            "verifiable_intermediate": False,
            "verifiable_outcome": True,
            "stochastic": False,
            "partially_observable": True,  # the agent sees only what its searches return
            "privileged_info": True,  # supporting documents and gold answer (privileged())
            "num_agents": 1,
            "compute_budget": "low",
            "env_reset_cheap": True,
            "prm_available": False,
        }

    def warmup_corpus(self, n: int, seed: int) -> list[tuple[str, list[tuple[str, str]]]]:
        """Format episodes over questions of both splits (the environment's real observations).

        What it teaches: one tool call per line — 0 to ``max_steps - 2`` calls drawn uniformly
        from search (2 random words of the question), calc (two random numbers), write / read
        (``notes.txt``) — then ``answer <x>``. What it does not: where to search or what to
        answer. ``x`` is drawn uniformly from the world's values of the gold answer's kind
        (countries, cities, numbers seen in observations...), so it is right only by chance."""
        rng = random.Random(f"tooluse-warmup|{seed}")
        qs = self.questions["train"] + self.questions["eval"]
        W = self.world
        names = {"founder_country": sorted(W["countries"]), "employer_hq": sorted(W["cities"]),
                 "hq_capital": sorted(W["cities"])}
        out = []
        for i in range(n):
            q = qs[rng.randrange(len(qs))]
            inst = TaskInstance(task_id=f"tool-warmup-{i}", split="warmup", seed=i, spec=dict(q))
            env = self.make(inst)
            prompt = env.reset()
            words = search_terms(q["question"])
            turns: list[tuple[str, str]] = []
            numbers: list[str] = []
            for _ in range(rng.randint(0, max(0, min(3, int(self.cfg.max_steps) - 2)))):
                kind = rng.choice(["search", "search", "calc", "write", "read"])
                if kind == "search":
                    act = "search " + " ".join(rng.sample(words, k=min(2, len(words))))
                elif kind == "calc":
                    a, b = rng.choice(numbers or ["12"]), rng.choice(numbers or ["30"])
                    act = f"calc {a}{rng.choice('+-*')}{b}"
                elif kind == "write":
                    act = "write notes.txt " + " ".join(rng.sample(words, k=min(3, len(words))))
                else:
                    act = "read notes.txt"
                res = env.step(act + "\n")
                numbers += re.findall(r"\b\d+\b", res.observation)
                turns.append((act + "\n", res.observation))
            pool = names.get(q["type"]) or numbers or [str(rng.randint(1, 99))]
            act = f"answer {rng.choice(pool)}\n"
            res = env.step(act)
            turns.append((act, res.observation))
            out.append((prompt, turns))
        return out
