"""Multi-hop question answering with tools over a small fictional world (survey §5, §8.2).

The world (people, cities, countries, companies with attributes) is generated deterministically
by :func:`generate_world` and shipped as ``environments/data/tooluse_world.json`` (the shipped
file equals ``generate_world(0)``; a test checks it). Every entity has one short document; a
question needs 2–3 of them (e.g. "In which country was the founder of Brightline born?": the
company's document names the founder, the founder's names the birth city, the city's names the
country), some also need arithmetic ("How many employees do A and B have together?").

Tools (one per turn; the policy's action is one line ending with ``"\\n"``)
------------------------------------------------------------------------
* ``search <query>`` — BM25 (:class:`BM25`, written here) over the documents' titles and texts;
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
arise: this family never execs). Terminal reward 1.0 iff the answer is right.

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
import math as _math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
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
    hash_split,
    require_spec,
)
from environments.registry import register_family
from environments.tasks.math_checker import ParseError, evaluate, format_number, parse_answer
from stages.config_fields import param

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
WORLD_FILE = DATA_DIR / "tooluse_world.json"
TOOLS = ("search", "calc", "read", "write", "answer")
EVAL_SHARE = 5
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
    train_size: int = param(512, help="train-split instance pool size (cycles through the split's questions)", ge=0)
    eval_size: int = param(128, help="eval-split instance pool size", ge=0)


# ----------------------------------------------------------------------------- world

_SYL = ["ka", "lo", "mi", "ra", "ven", "tor", "sel", "da", "nor", "bel", "quin", "sa", "ul", "fen", "gar", "is",
        "mor", "ta", "pel", "dri", "an", "ost", "vel", "cor"]
_FIRST = ["Ada", "Boris", "Cleo", "Dario", "Edda", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Lars", "Mina",
          "Nils", "Olga", "Pavel", "Rosa", "Sven", "Tara", "Ugo", "Vera", "Wim", "Yara", "Zeno"]
_PROFESSIONS = ["engineer", "chemist", "architect", "teacher", "pilot", "banker", "painter", "surgeon", "writer",
                "geologist"]
_INDUSTRIES = ["shipping", "software", "textile", "mining", "bakery", "robotics", "insurance", "publishing"]
_CURRENCIES = ["crown", "mark", "dinar", "florin", "ducat", "lira", "taler", "real"]


def _name(rng: random.Random, used: set[str], parts: int, suffix: str = "") -> str:
    while True:
        n = "".join(rng.choice(_SYL) for _ in range(parts)).capitalize() + suffix
        if n not in used and len(n) >= 4:
            used.add(n)
            return n


def generate_world(seed: int = 0, countries: int = 6, cities: int = 18, people: int = 30,
                   companies: int = 15) -> dict[str, Any]:
    """The fictional world: entities, attributes and one document per entity (deterministic)."""
    rng = random.Random(f"tooluse-world|{seed}")
    used: set[str] = set()
    W: dict[str, Any] = {"seed": seed, "countries": {}, "cities": {}, "people": {}, "companies": {}}
    country_names = [_name(rng, used, 2, "ia" if i % 2 else "land") for i in range(countries)]
    city_names = [_name(rng, used, 2) for _ in range(cities)]
    for i, c in enumerate(city_names):
        W["cities"][c] = {"country": country_names[i % countries], "population": rng.randrange(20, 900) * 1000}
    for i, c in enumerate(country_names):
        W["countries"][c] = {"capital": city_names[i], "currency": _CURRENCIES[i % len(_CURRENCIES)]}
    person_names = []
    for _ in range(people):
        while True:
            n = f"{rng.choice(_FIRST)} {_name(rng, set(), 2)}"
            if n not in used:
                used.add(n)
                break
        person_names.append(n)
    company_names = [_name(rng, used, 2, rng.choice(["corp", "works", "line", " Ltd"])) for _ in range(companies)]
    for i, c in enumerate(company_names):
        W["companies"][c] = {"founder": person_names[i], "headquarters": rng.choice(city_names),
                             "founded": rng.randint(1950, 2020), "employees": rng.randrange(5, 500) * 10,
                             "industry": rng.choice(_INDUSTRIES)}
    for i, p in enumerate(person_names):
        W["people"][p] = {"born_in": rng.choice(city_names), "works_at": company_names[(i * 7 + 3) % companies],
                          "profession": rng.choice(_PROFESSIONS), "age": rng.randint(25, 80)}
    docs = []
    for c, a in W["countries"].items():
        docs.append({"id": f"country/{_slug(c)}", "title": c,
                     "text": f"{c} is a country whose capital is {a['capital']}. Its currency is the {a['currency']}."})
    for c, a in W["cities"].items():
        docs.append({"id": f"city/{_slug(c)}", "title": c,
                     "text": f"{c} is a city in {a['country']} with a population of {a['population']}."})
    for p, a in W["people"].items():
        docs.append({"id": f"person/{_slug(p)}", "title": p,
                     "text": f"{p} is a {a['profession']} born in {a['born_in']}. {p.split()[0]} works at "
                             f"{a['works_at']} and is {a['age']} years old."})
    for c, a in W["companies"].items():
        docs.append({"id": f"company/{_slug(c)}", "title": c,
                     "text": f"{c} is a {a['industry']} company founded in {a['founded']} by {a['founder']}. "
                             f"Its headquarters are in {a['headquarters']}. It has {a['employees']} employees."})
    W["documents"] = docs
    return W


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _doc_id(kind: str, name: str) -> str:
    return f"{kind}/{_slug(name)}"


QUESTION_TYPES = ("founder_country", "employer_hq", "founder_age", "birth_population", "founding_gap",
                  "employees_sum", "hq_capital")


def all_questions(W: dict[str, Any]) -> list[dict[str, Any]]:
    """Every question of the world: text, gold answer, supporting document ids, type, answer kind."""
    P, C, Ci, Co = W["people"], W["companies"], W["cities"], W["countries"]
    qs = []
    comps = sorted(C)
    for c in comps:
        f = C[c]["founder"]
        city = P[f]["born_in"]
        qs.append(("founder_country", f"In which country was the founder of {c} born?", Ci[city]["country"],
                   [_doc_id("company", c), _doc_id("person", f), _doc_id("city", city)]))
        qs.append(("founder_age", f"How old is the founder of {c}?", str(P[f]["age"]),
                   [_doc_id("company", c), _doc_id("person", f)]))
        hq = C[c]["headquarters"]
        country = Ci[hq]["country"]
        qs.append(("hq_capital", f"What is the capital of the country where {c} has its headquarters?",
                   Co[country]["capital"], [_doc_id("company", c), _doc_id("city", hq), _doc_id("country", country)]))
    for i, a in enumerate(comps):
        for b in (comps[(i + 1) % len(comps)], comps[(i + 4) % len(comps)]):
            ya, yb = C[a]["founded"], C[b]["founded"]
            if ya != yb:
                first, second = (a, b) if ya < yb else (b, a)
                qs.append(("founding_gap", f"How many years before {second} was {first} founded?",
                           str(abs(ya - yb)), [_doc_id("company", first), _doc_id("company", second)]))
            qs.append(("employees_sum", f"How many employees do {a} and {b} have together?",
                       str(C[a]["employees"] + C[b]["employees"]), [_doc_id("company", a), _doc_id("company", b)]))
    for p in sorted(P):
        comp = P[p]["works_at"]
        qs.append(("employer_hq", f"In which city is the headquarters of the company where {p} works?",
                   C[comp]["headquarters"], [_doc_id("person", p), _doc_id("company", comp)]))
        qs.append(("birth_population", f"What is the population of the city where {p} was born?",
                   str(Ci[P[p]["born_in"]]["population"]), [_doc_id("person", p), _doc_id("city", P[p]["born_in"])]))
    out = []
    for qtype, text, ans, docs in qs:
        out.append({"type": qtype, "question": text, "answer": ans, "supporting_docs": docs,
                    "numeric": bool(re.fullmatch(r"-?\d+", ans))})
    return out


def question_split(question: str) -> str:
    return hash_split(f"tooluse|{question}", EVAL_SHARE)


# ----------------------------------------------------------------------------- BM25


_WORD = re.compile(r"[a-z0-9]+")


def _terms(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 (k1=1.2, b=0.75) over documents' title + text; ties broken by document order."""

    def __init__(self, docs: list[dict[str, Any]], k1: float = 1.2, b: float = 0.75):
        self.docs, self.k1, self.b = docs, k1, b
        self.tf = [Counter(_terms(d["title"] + " " + d["text"])) for d in docs]
        self.len = [sum(tf.values()) for tf in self.tf]
        self.avg = sum(self.len) / max(len(docs), 1)
        df: Counter[str] = Counter()
        for tf in self.tf:
            df.update(tf.keys())
        n = len(docs)
        self.idf = {t: _math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    def scores(self, query: str) -> list[float]:
        q = _terms(query)[:64]
        out = []
        for tf, L in zip(self.tf, self.len):
            s = 0.0
            for t in q:
                f = tf.get(t, 0)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * L / self.avg))
            out.append(s)
        return out

    def search(self, query: str, k: int) -> list[dict[str, Any]]:
        sc = self.scores(query)
        order = sorted((i for i in range(len(sc)) if sc[i] > 0), key=lambda i: (-sc[i], i))
        return [self.docs[i] for i in order[:k]]


# ----------------------------------------------------------------------------- answers


def _norm_name(text: str) -> str:
    t = re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()
    if t and t[0] == "the":
        t = t[1:]
    return "".join(t)


def check_answer(text: str, gold: str, numeric: bool) -> bool:
    """Whether ``text`` (with or without the ``answer`` prefix) names ``gold``."""
    if not isinstance(text, str):
        return False
    body = re.sub(r"^\s*answer\b\s*[:=]?\s*", "", text, flags=re.IGNORECASE).strip()
    if numeric:
        v = parse_answer(body)
        return v is not None and v == Fraction(gold)
    return bool(body) and _norm_name(body.rstrip(".")) == _norm_name(gold)


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
        info: dict[str, Any] = {"turn": t, "tool": tool if tool in TOOLS else None, "turn_reward": 0.0}
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
        if len(out) > int(self.cfg.obs_chars):
            out = out[: max(int(self.cfg.obs_chars) - 3, 0)] + "..."
        if self._t >= int(self.cfg.max_steps):
            return self._end(prefix + out + "\ndone: no answer", "max_turns", action, info)
        return StepResult(observation=prefix + out + "\n", reward=0.0, done=False, action=action,
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
        return StepResult(observation=obs, reward=info["terminal_reward"], done=True, action=action,
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


def load_world(path: str = "") -> dict[str, Any]:
    p = Path(path).expanduser() if path else WORLD_FILE
    if not p.is_file():
        raise FileNotFoundError(f"config key 'env.world': no world file at {str(p)!r}")
    return json.loads(p.read_text())


#: planning text of a tool call (HICRA, Wang et al. 2025c §3; the plan-execute hierarchy of
#: agentic tasks, survey §5.4): ``search <query>`` chooses the next hop of the multi-hop question
#: (which entity to look up) and ``write <path> <text>`` writes the plan or what was found into
#: notes: they plan. ``calc`` (arithmetic on known numbers), ``read`` (fetching notes) and
#: ``answer`` execute and commit.
PLANNING_PATTERN = r"^\s*(?i:search|write)\b.*"


@register_family
class ToolUseFamily(TaskFamily):
    name = "tooluse"
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
            words = _terms(q["question"])
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
