"""The survey's method-selection decision tree (§7.5, Table 8, Figure 4) as code.

Source: ``credit-assignment-survey`` §7 "Systematic Comparison". §7.5 gives Table 8
("Practical Guidance: Matching Methods to Scenarios": scenario, characteristics, promising
candidates, key consideration) and says "Figure 4 provides a complementary decision tree that
operationalizes Table 8 as a step-by-step selection process". The figure's boxes are *not* in
the survey's text, so the tree below is a reconstruction: its leaves are exactly Table 8's seven
rows (candidates and key consideration), the questions leading to them are Table 8's
"Characteristics" column, and the order of candidates inside a leaf is decided with the §7.1
comparison-table columns (Compute, Aux. Model, Methodology) and the §7.4 trade-offs.

Branches, in the order they are asked (each taken decision is recorded in ``Recommendation.path``):

1. **Multi-agent?** (``setting == "multi-agent"`` or ``num_agents > 1``) -> leaf
   *Multi-agent systems*: M-GRPO, C3, LLM-MCA -- "Decomposition across agents is key".
   C3 is High compute (§7.1), so a low budget moves it last.
2. **Compute budget low?** -> leaf *Compute-constrained training*: GRPO, CARL, iStar, GiGPO --
   "Critic-free, low overhead". Candidates are filtered to the profile's setting (CARL, iStar
   and GiGPO are agentic methods, Appendix B), and GRPO -- "cheapest but least informative"
   (§7.4 trade-off 1) -- is ranked after the agentic ones.
3. **Reasoning (single generation, ``turns == 1``)** -- a "reasoning" profile with more than one
   turn is routed as agentic (§4: reasoning RL is a single generation):

   3a. *Outcome not verifiable* -- outside Table 8 (every reasoning row is "verifiable");
       extrapolated to CAPO (LLM-as-critic, no verifier needed) then GRPO with a learned reward.
   3b. *Long CoT* (``trajectory_tokens >= 10_000``, Table 8 "Long CoT (10K-30K)") -> leaf
       *Hard math/competition*: VinePPO, HICRA, CAPO -- "Compute budget scales with CoT length".
       VinePPO first only with a high budget and cheap re-execution from prefixes (§7.4 trade-off
       1: token-level MC is the most precise and most expensive); otherwise HICRA first.
   3c. *Short CoT* -> leaf *Math reasoning*: GRPO (baseline), PURE, SPO, SPRO -- "PRM
       supervision readily available". Inside it:
       - high budget and cheap re-execution -> VinePPO is placed first (deterministic
         transitions make MC forking cheap, §4 / §7.4; VinePPO's own benchmarks are GSM8K and
         MATH, Appendix B) -- needed for the survey's "VinePPO on MATH" retrospective case;
       - a PRM is available -> PURE first (min-form PRM credit; Aux. Model = PRM);
       - no PRM but cheap re-execution -> SPO first (segment-level MC, Med compute, no aux);
       - neither -> SPRO first (masked step advantage, no aux model, no re-execution).
       GRPO, the baseline, comes after the CA methods.
4. **Agentic** (multi-turn):

   4a. *Very long horizon* (``turns > 30``; Table 8: web navigation 10-30 turns vs software
       engineering 50-100+) -> leaf *Software engineering*: CARL, HCAPO, C3/CCPO, ArCHer --
       "Sparse credit + hindsight analysis". HCAPO first (hindsight has "a strict informational
       advantage", §7.4 trade-off 2), then CARL; with a high budget the counterfactual C3/CCPO
       (High compute) move ahead of CARL.
   4b. *Stochastic or partially observable* (Table 8 "stochastic, POMDP") -> leaf *Web
       navigation*: SWEET-RL, HCAPO, IGPO -- "Privileged critic exploits training info".
       SWEET-RL first only when training-time privileged information exists; otherwise HCAPO.
   4c. otherwise -> leaf *Tool-use agents* (5-20 turns, partially verifiable tools): GiGPO,
       AgentPRM, Turn-PPO -- "Critic-free preferred for efficiency" (GiGPO is critic-free;
       AgentPRM and Turn-PPO need a critic, §7.1).

After the leaf's candidates, GRPO is appended (if absent) as the episode-level baseline every
CA paper should compare against (Appendix C). Scores are rank-based (1.0, 0.9, ...; baseline
0.3), so ranking is deterministic.

Retrospective validation (§7.5): "We traced 6 known (task, method) pairs through the tree: SPO on
GSM8K, HICRA on AIME'24, VinePPO on MATH, GiGPO on ALFWorld, SWEET-RL on ColBench, and HCAPO on
long-horizon agentic tasks. All 6 are recovered (6/6)." :data:`RETROSPECTIVE_CASES` encodes these
with profiles built from Table 8's characteristics and each paper's compute class (§7.1);
:func:`retrospective_validation` counts a case as a hit when the expected method is the *top-1*
recommendation (stricter than the survey's "recovered").

Standard library only (``omegaconf`` is imported lazily for YAML files).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SETTINGS = ("reasoning", "agentic", "multi-agent")
COMPUTE_BUDGETS = ("low", "medium", "high")

LONG_COT_TOKENS = 10_000  # Table 8, hard math: "Long CoT (10K-30K)"
LONG_HORIZON_TURNS = 30  # Table 8: web navigation "10-30 turns", SWE "50-100+ turns"

# registry-style name -> survey display name (§7.1 / Appendix B spelling).
DISPLAY_NAMES: dict[str, str] = {
    "grpo": "GRPO",
    "vineppo": "VinePPO",
    "spo": "SPO",
    "pure": "PURE",
    "spro": "SPRO",
    "capo": "CAPO",
    "hicra": "HICRA",
    "gigpo": "GiGPO",
    "agentprm": "AgentPRM",
    "turn-ppo": "Turn-PPO",
    "sweet-rl": "SWEET-RL",
    "hcapo": "HCAPO",
    "igpo": "IGPO",
    "carl": "CARL",
    "istar": "iStar",
    "c3": "C3",
    "ccpo": "CCPO",
    "archer": "ArCHer",
    "m-grpo": "M-GRPO",
    "llm-mca": "LLM-MCA",
}

# Table 8 rows: leaf id -> (scenario, characteristics, candidates in table order, key consideration)
TABLE8: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "math": ("Math reasoning (GSM8K, MATH)", "Short CoT, verifiable, deterministic",
             ("grpo", "pure", "spo", "spro"), "PRM supervision readily available"),
    "hard-math": ("Hard math/competition (AIME, IMO)", "Long CoT (10K-30K), verifiable",
                  ("vineppo", "hicra", "capo"), "Compute budget scales with CoT length"),
    "tool-use": ("Tool-use agents (WebShop, ALFWorld)", "5-20 turns, partially verifiable tools",
                 ("gigpo", "agentprm", "turn-ppo"), "Critic-free preferred for efficiency"),
    "web-nav": ("Web navigation (WebArena)", "10-30 turns, stochastic, POMDP",
                ("sweet-rl", "hcapo", "igpo"), "Privileged critic exploits training info"),
    "swe": ("Software engineering (SWE-bench)", "50-100+ turns, very long context, non-verifiable",
            ("carl", "hcapo", "c3", "ccpo", "archer"), "Sparse credit + hindsight analysis"),
    "multi-agent": ("Multi-agent systems", "Cross-agent credit, communication",
                    ("m-grpo", "c3", "llm-mca"), "Decomposition across agents is key"),
    "compute": ("Compute-constrained training", "Limited GPU budget",
                ("grpo", "carl", "istar", "gigpo"), "Critic-free, low overhead"),
}

BASELINE_CONSIDERATION = ("Episode-level baseline: cheapest but least informative (§7.4); "
                          "report it alongside any CA method (Appendix C)")

# One-line per-method rationale (§7.1 columns: granularity, methodology, aux model, compute).
_METHOD_NOTES: dict[str, str] = {
    "grpo": "episode-level group baseline, no aux model, lowest compute",
    "vineppo": "token-level MC rollouts from prefixes, no aux model, high compute",
    "spo": "segment-level MC, no aux model, medium compute",
    "pure": "step-level min-form PRM credit, needs a PRM, medium compute",
    "spro": "step-level masked advantage, no aux model, medium compute",
    "capo": "step-level LLM-as-critic, needs an LLM judge, medium compute",
    "hicra": "step-level hierarchy (planning tokens), no aux model, medium compute",
    "gigpo": "step-level group MC over anchor states, critic-free, low compute",
    "agentprm": "step-level TD+GAE, needs a critic, medium compute",
    "turn-ppo": "turn-level MDP PPO, needs a critic, medium compute",
    "sweet-rl": "turn-level privileged (asymmetric) critic, medium compute",
    "hcapo": "turn-level hindsight credit, LLM aux, medium compute",
    "igpo": "turn-level information gain, verifier, medium compute",
    "carl": "step-level entropy-based critical actions, no aux model, low compute",
    "istar": "step-level implicit DPO rewards, no aux model, low compute",
    "c3": "turn-level counterfactual credit, no aux model, high compute",
    "ccpo": "turn-level counterfactual credit, no aux model, high compute",
    "archer": "turn-level hierarchical TD, needs a critic, medium compute",
    "m-grpo": "hierarchical multi-agent GRPO, no aux model, medium compute",
    "llm-mca": "LLM-critic multi-agent credit, LLM aux, medium compute",
}

@dataclass
class TaskProfile:
    """Task characteristics the tree branches on (Table 8 "Characteristics", §4 comparison)."""

    setting: str = "reasoning"  # "reasoning" | "agentic" | "multi-agent" (Appendix B setting R/A/M)
    turns: int = 1  # interaction turns per episode; 1 for single-generation reasoning
    trajectory_tokens: int = 1_000  # typical tokens per trajectory (CoT length / full context)
    verifiable_intermediate: bool = False  # intermediate steps can be checked (e.g. tool results)
    verifiable_outcome: bool = True  # final outcome has a verifiable reward (answer check, tests)
    stochastic: bool = False  # environment transitions are stochastic
    partially_observable: bool = False  # agent sees observations, not the full state (POMDP)
    privileged_info: bool = False  # training-time privileged information available (e.g. reference solution)
    num_agents: int = 1  # number of trained/interacting LLM agents
    compute_budget: str = "medium"  # "low" | "medium" | "high"
    env_reset_cheap: bool = True  # can cheaply re-run from intermediate states (prefix forking, snapshots)
    prm_available: bool = False  # a process reward model (step-level verifier) is available

    def __post_init__(self) -> None:
        _validate(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskProfile:
        """Build a profile from a mapping; unknown keys or bad values raise ValueError naming the key."""
        if not isinstance(d, Mapping):
            raise ValueError(f"task profile must be a mapping, got {type(d).__name__}")  # noqa: TRY004
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown task-profile key {key!r} (known: {', '.join(sorted(known))})")
        return cls(**dict(d))

    @classmethod
    def from_file(cls, path: str | Path) -> TaskProfile:
        """Load a profile from ``.json`` or ``.yaml``/``.yml``."""
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix == ".json":
            data = json.loads(p.read_text())
        elif suffix in (".yaml", ".yml"):
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
        else:
            raise ValueError(f"unsupported task-profile file type {suffix!r} (use .json, .yaml or .yml)")
        return cls.from_dict(data if data is not None else {})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_file(self, path: str | Path) -> None:
        """Write the profile as ``.json`` or ``.yaml``/``.yml``."""
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix == ".json":
            p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        elif suffix in (".yaml", ".yml"):
            from omegaconf import OmegaConf

            p.write_text(OmegaConf.to_yaml(OmegaConf.create(self.to_dict())))
        else:
            raise ValueError(f"unsupported task-profile file type {suffix!r} (use .json, .yaml or .yml)")


_BOOL_KEYS = ("verifiable_intermediate", "verifiable_outcome", "stochastic", "partially_observable",
              "privileged_info", "env_reset_cheap", "prm_available")


def _validate(d: Mapping[str, Any]) -> None:
    if d["setting"] not in SETTINGS:
        raise ValueError(f"setting: must be one of {SETTINGS}, got {d['setting']!r}")
    if d["compute_budget"] not in COMPUTE_BUDGETS:
        raise ValueError(f"compute_budget: must be one of {COMPUTE_BUDGETS}, got {d['compute_budget']!r}")
    for key in ("turns", "trajectory_tokens", "num_agents"):
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key}: must be a positive integer, got {v!r}")
    for key in _BOOL_KEYS:
        if not isinstance(d[key], bool):
            raise ValueError(f"{key}: must be a boolean, got {d[key]!r}")  # noqa: TRY004 (brief: ValueError)
    if d["setting"] == "multi-agent" and d["num_agents"] < 2:
        raise ValueError(f"num_agents: setting 'multi-agent' needs num_agents >= 2, got {d['num_agents']}")


@dataclass
class Recommendation:
    method: str  # registry-style name, e.g. "vineppo"
    score: float  # rank-based score in (0, 1]; higher is better
    consideration: str  # Table 8 "Key consideration" for the leaf (or the baseline note)
    rationale: str  # why this method, at this rank
    path: list[str] = field(default_factory=list)  # branch decisions taken to reach the leaf

    @property
    def display_name(self) -> str:
        return DISPLAY_NAMES.get(self.method, self.method)


def _walk(p: TaskProfile) -> tuple[str, list[str], list[str]]:
    """Return (leaf id, ordered candidates, path) for a profile."""
    path: list[str] = []
    budget = p.compute_budget

    # 1. multi-agent
    if p.setting == "multi-agent" or p.num_agents > 1:
        path.append(f"multi-agent (setting={p.setting}, num_agents={p.num_agents}) -> Multi-agent systems")
        order = ["m-grpo", "c3", "llm-mca"]
        if budget == "low":
            order = ["m-grpo", "llm-mca", "c3"]
            path.append("compute low -> C3 (High compute) last")
        return "multi-agent", order, path
    path.append("single agent")

    agentic = p.setting == "agentic" or p.turns > 1
    if p.setting == "reasoning" and p.turns > 1:
        path.append(f"reasoning with turns={p.turns} > 1 -> treated as multi-turn (agentic branch)")

    # 2. compute-constrained
    if budget == "low":
        path.append("compute budget low -> Compute-constrained training")
        if agentic:
            path.append("agentic: agent-native critic-free methods before GRPO")
            return "compute", ["carl", "istar", "gigpo", "grpo"], path
        path.append("reasoning: only GRPO of this row applies (CARL/iStar/GiGPO are agentic)")
        return "compute", ["grpo"], path
    path.append(f"compute budget {budget}")

    if not agentic:
        path.append("reasoning (single generation)")
        if not p.verifiable_outcome:
            path.append("outcome not verifiable -> outside Table 8; LLM-as-critic (extrapolation)")
            return "unverifiable-reasoning", ["capo", "grpo"], path
        mc_ok = budget == "high" and p.env_reset_cheap
        if p.trajectory_tokens >= LONG_COT_TOKENS:
            path.append(f"long CoT ({p.trajectory_tokens} >= {LONG_COT_TOKENS} tokens) -> Hard math/competition")
            if mc_ok:
                path.append("high budget + cheap re-execution -> VinePPO first")
                return "hard-math", ["vineppo", "hicra", "capo"], path
            path.append("MC cost scales with CoT length and budget is not high or re-execution not cheap -> HICRA first")
            return "hard-math", ["hicra", "capo", "vineppo"], path
        path.append(f"short CoT ({p.trajectory_tokens} < {LONG_COT_TOKENS} tokens) -> Math reasoning")
        if mc_ok:
            path.append("high budget + cheap re-execution -> token-level MC (VinePPO) first")
            order = ["vineppo", "spo", "pure", "spro"] if not p.prm_available else ["vineppo", "pure", "spo", "spro"]
        elif p.prm_available:
            path.append("PRM available -> PURE first")
            order = ["pure", "spo", "spro"] if p.env_reset_cheap else ["pure", "spro", "spo"]
        elif p.env_reset_cheap:
            path.append("no PRM, cheap re-execution -> segment-level MC (SPO) first")
            order = ["spo", "spro", "pure"]
        else:
            path.append("no PRM, no cheap re-execution -> SPRO (no aux model, no re-execution) first")
            order = ["spro", "pure", "spo"]
        return "math", order + ["grpo"], path

    # 4. agentic
    path.append(f"agentic ({p.turns} turns)")
    if p.turns > LONG_HORIZON_TURNS:
        path.append(f"very long horizon ({p.turns} > {LONG_HORIZON_TURNS} turns) -> Software engineering / long-horizon")
        if budget == "high":
            path.append("high budget -> counterfactual C3/CCPO ahead of CARL")
            return "swe", ["hcapo", "c3", "ccpo", "carl", "archer"], path
        return "swe", ["hcapo", "carl", "c3", "ccpo", "archer"], path
    if p.stochastic or p.partially_observable:
        path.append("stochastic or partially observable -> Web navigation")
        if p.privileged_info:
            path.append("privileged training info -> SWEET-RL first")
            return "web-nav", ["sweet-rl", "hcapo", "igpo"], path
        path.append("no privileged info -> hindsight (HCAPO) first")
        return "web-nav", ["hcapo", "igpo", "sweet-rl"], path
    path.append("deterministic, fully observable, moderate horizon -> Tool-use agents")
    return "tool-use", ["gigpo", "agentprm", "turn-ppo"], path


def recommend(profile: TaskProfile, top_k: int = 5) -> list[Recommendation]:
    """Ranked recommendations for ``profile`` following the reconstructed Figure 4 tree."""
    if top_k < 1:
        raise ValueError(f"top_k: must be >= 1, got {top_k!r}")
    leaf, order, path = _walk(profile)
    if leaf in TABLE8:
        scenario, characteristics, _, consideration = TABLE8[leaf]
        where = f"Table 8 '{scenario}' ({characteristics})"
    else:
        consideration = "No Table 8 row applies; LLM-as-critic credit needs no verifier"
        where = "extrapolation beyond Table 8"
    recs: list[Recommendation] = []
    for i, m in enumerate(order):
        cons = BASELINE_CONSIDERATION if (m == "grpo" and leaf != "compute") else consideration
        recs.append(Recommendation(method=m, score=round(1.0 - 0.1 * i, 2), consideration=cons,
                                   rationale=f"{where}: {_METHOD_NOTES[m]}", path=list(path)))
    if "grpo" not in order:
        recs.append(Recommendation(method="grpo", score=0.3, consideration=BASELINE_CONSIDERATION,
                                   rationale=f"baseline: {_METHOD_NOTES['grpo']}", path=list(path)))
    return recs[:top_k]


def in_recommended(method_name: str, profile: TaskProfile, top_k: int = 5) -> bool:
    """Whether ``method_name`` (registry or display name) is among the top-k recommendations."""
    key = method_name.lower().replace("_", "-")
    return any(r.method == key for r in recommend(profile, top_k=top_k))


# §7.5 retrospective validation: (benchmark, profile per Table 8 / §7.1, expected method).
RETROSPECTIVE_CASES: tuple[tuple[str, TaskProfile, str], ...] = (
    ("GSM8K", TaskProfile(setting="reasoning", turns=1, trajectory_tokens=500, verifiable_intermediate=True,
                          verifiable_outcome=True, compute_budget="medium", env_reset_cheap=True), "spo"),
    ("AIME'24", TaskProfile(setting="reasoning", turns=1, trajectory_tokens=16_000, verifiable_outcome=True,
                            compute_budget="medium", env_reset_cheap=True), "hicra"),
    ("MATH", TaskProfile(setting="reasoning", turns=1, trajectory_tokens=1_000, verifiable_intermediate=True,
                         verifiable_outcome=True, compute_budget="high", env_reset_cheap=True), "vineppo"),
    ("ALFWorld", TaskProfile(setting="agentic", turns=20, trajectory_tokens=20_000, verifiable_intermediate=True,
                             verifiable_outcome=True, compute_budget="medium", env_reset_cheap=True), "gigpo"),
    ("ColBench", TaskProfile(setting="agentic", turns=10, trajectory_tokens=8_000, verifiable_outcome=True,
                             stochastic=True, partially_observable=True, privileged_info=True,
                             compute_budget="medium", env_reset_cheap=False), "sweet-rl"),
    ("long-horizon agentic", TaskProfile(setting="agentic", turns=60, trajectory_tokens=150_000,
                                         verifiable_outcome=True, stochastic=True, partially_observable=True,
                                         compute_budget="medium", env_reset_cheap=False), "hcapo"),
)


def retrospective_validation(top_k: int = 1) -> tuple[int, int, list[dict[str, Any]]]:
    """Trace the six §7.5 cases; a hit means the expected method is within the top ``top_k`` (default top-1)."""
    details: list[dict[str, Any]] = []
    hits = 0
    for bench, prof, expected in RETROSPECTIVE_CASES:
        recs = recommend(prof, top_k=5)
        got = [r.method for r in recs]
        hit = expected in got[:top_k]
        hits += hit
        details.append({"benchmark": bench, "expected": expected, "top": got[0] if got else None,
                        "ranking": got, "hit": hit, "path": recs[0].path if recs else []})
    return hits, len(RETROSPECTIVE_CASES), details


def render(recs: Sequence[Recommendation]) -> str:
    """Plain-text table for the CLI."""
    header = ("#", "method", "name", "score", "key consideration", "rationale")
    rows = [(str(i + 1), r.method, r.display_name, f"{r.score:.2f}", r.consideration, r.rationale)
            for i, r in enumerate(recs)]
    widths = [max(len(h), *(len(row[c]) for row in rows)) if rows else len(h) for c, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header), line(["-" * w for w in widths])]
    out.extend(line(row) for row in rows)
    if recs:
        out.append("")
        out.append("path: " + " > ".join(recs[0].path))
    return "\n".join(out)
