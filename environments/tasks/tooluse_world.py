"""The tool-use family's fictional world: its generator, the questions over it, BM25 search and
answer checking (split out of :mod:`environments.tasks.tooluse`, which documents the family).

The world (people, cities, countries, companies with attributes) is generated deterministically by
:func:`generate_world` and shipped as ``environments/data/tooluse_world.json`` (the shipped file
equals ``generate_world(0)``; a test checks it).
"""

from __future__ import annotations

import json
import math as _math
import random
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

from environments.base import hash_split
from environments.tasks.math_checker import parse_answer

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
WORLD_FILE = DATA_DIR / "tooluse_world.json"
EVAL_SHARE = 5

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


def search_terms(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 (k1=1.2, b=0.75) over documents' title + text; ties broken by document order."""

    def __init__(self, docs: list[dict[str, Any]], k1: float = 1.2, b: float = 0.75):
        self.docs, self.k1, self.b = docs, k1, b
        self.tf = [Counter(search_terms(d["title"] + " " + d["text"])) for d in docs]
        self.len = [sum(tf.values()) for tf in self.tf]
        self.avg = sum(self.len) / max(len(docs), 1)
        df: Counter[str] = Counter()
        for tf in self.tf:
            df.update(tf.keys())
        n = len(docs)
        self.idf = {t: _math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    def scores(self, query: str) -> list[float]:
        q = search_terms(query)[:64]
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


def load_world(path: str = "") -> dict[str, Any]:
    p = Path(path).expanduser() if path else WORLD_FILE
    if not p.is_file():
        raise FileNotFoundError(f"config key 'env.world': no world file at {str(p)!r}")
    return json.loads(p.read_text())
