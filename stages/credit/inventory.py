"""The survey's paper inventory as data: Appendix B (Table 10, "Complete Paper Inventory").

The survey promises a "structured inventory (CSV and JSON)" of the 47 reviewed methods with
their taxonomy labels, baseline families, evidence levels and primary benchmarks (survey §9.5).
``stages/credit/data/inventory.json`` is that inventory, transcribed from Appendix B (Table 10:
the 47 numbered rows plus the 4 "Background / Foundational" rows, which carry ``number=None``)
and completed with full names and section references from Appendix A (Table 9, "Method
Quick-Reference Index"), or from the survey body / reference list for rows Table 9 lacks.

Each row also records how it relates to this repository's credit registry
(:mod:`stages.credit.registry`): ``status`` is ``"implemented"`` (with the ``registry_name``),
``"planned"`` or ``"not-applicable"``, and ``status_reason`` says why; an implemented row that
departs from its paper on purpose says what in ``simplified``, rendered as
``implemented (simplified: <what>)`` (:func:`status_text`). Registry methods that are
episode-level baselines rather than reviewed papers are listed under ``registry_extras``.

Pure standard library: the JSON is read with :mod:`importlib.resources`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, fields
from importlib import resources
from typing import Any, Iterable, Optional, Sequence

_PACKAGE = "stages.credit"
_RESOURCE = ("data", "inventory.json")

STATUSES = ("implemented", "planned", "not-applicable")

# Legend of Appendix B (Table 10).
TYPE_LABELS = {"C": "Core CA method", "E": "CA-adjacent enabler"}
SETTING_LABELS = {"R": "Reasoning RL", "A": "Agentic RL", "M": "Multi-Agent"}
BASELINE_LABELS = {"G": "GRPO", "P": "PPO", "D": "DPO", "O": "ORM", "T": "TD"}
EVIDENCE_LABELS = {"S": "strong empirical", "L": "limited but suggestive", "A": "primarily analytical"}


@dataclass(frozen=True)
class InventoryRow:
    """One row of Appendix B (Table 10); background rows have ``number=None`` and ``type=None``."""

    number: Optional[int]
    method: str
    full_name: str
    reference: str
    section: str
    type: Optional[str]
    type_label: str
    setting: tuple[str, ...]
    granularity: str
    methodology: str
    baseline_family: Optional[str]
    baseline_label: str
    evidence: str
    evidence_label: str
    primary_benchmarks: tuple[str, ...]
    group: str
    status: str
    registry_name: Optional[str]
    status_reason: str
    #: for an implemented row that departs from its paper on purpose: what was simplified ("" = faithful)
    simplified: str = ""

    @property
    def is_background(self) -> bool:
        """Background / foundational row (Table 10's last group, not counted in the 47)."""
        return self.number is None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InventoryRow":
        kw = {f.name: d.get(f.name) for f in fields(cls)}
        kw["setting"] = tuple(d.get("setting") or ())
        kw["primary_benchmarks"] = tuple(d.get("primary_benchmarks") or ())
        for key in ("full_name", "reference", "section", "baseline_label", "status_reason", "simplified"):
            kw[key] = kw[key] or ""
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["setting"] = list(self.setting)
        d["primary_benchmarks"] = list(self.primary_benchmarks)
        return d


def _load_document() -> dict[str, Any]:
    res = resources.files(_PACKAGE).joinpath(*_RESOURCE)
    return json.loads(res.read_text(encoding="utf-8"))


def load_inventory() -> list[InventoryRow]:
    """All rows of Appendix B (Table 10): the 47 reviewed methods, then the 4 background rows."""
    return [InventoryRow.from_dict(r) for r in _load_document()["rows"]]


def load_registry_extras() -> list[dict[str, str]]:
    """Registry methods that are episode-level baselines, not Appendix B rows."""
    return [dict(e) for e in _load_document().get("registry_extras", [])]


def filter_rows(
    rows: Iterable[InventoryRow],
    setting: Optional[str] = None,
    granularity: Optional[str] = None,
    methodology: Optional[str] = None,
) -> list[InventoryRow]:
    """Rows matching every given criterion (case-insensitive).

    ``setting`` ("R"/"A"/"M") matches a row having it among its settings (so "M" matches C3's
    "A/M"); ``granularity`` and ``methodology`` are substring matches ("token" matches
    "Token/Seg" and "Token/Turn").
    """
    out = []
    for r in rows:
        if setting is not None and setting.strip().lower() not in {s.lower() for s in r.setting}:
            continue
        if granularity is not None and granularity.strip().lower() not in r.granularity.lower():
            continue
        if methodology is not None and methodology.strip().lower() not in r.methodology.lower():
            continue
        out.append(r)
    return out


CSV_COLUMNS = tuple(f.name for f in fields(InventoryRow))
_LIST_SEP = "; "  # joins list cells in CSV; the slash of "A/M" is kept for settings


def to_csv(rows: Iterable[InventoryRow]) -> str:
    """Rows as CSV (header + one line per row). ``setting`` is joined by "/" as in Table 10,
    ``primary_benchmarks`` by "; "; ``None`` becomes the empty cell."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        d = r.to_dict()
        d["setting"] = "/".join(r.setting)
        d["primary_benchmarks"] = _LIST_SEP.join(r.primary_benchmarks)
        w.writerow(["" if d[c] is None else d[c] for c in CSV_COLUMNS])
    return buf.getvalue()


def to_json(rows: Iterable[InventoryRow]) -> str:
    """Rows as a JSON array of objects (same keys as ``data/inventory.json``'s rows)."""
    return json.dumps([r.to_dict() for r in rows], indent=2, ensure_ascii=False)


def status_text(r: InventoryRow) -> str:
    """``implemented (simplified: <what>)`` for a row with a ``simplified`` note, else the status."""
    if r.status == "implemented" and r.simplified:
        return f"implemented (simplified: {r.simplified})"
    return r.status


def render_table(rows: Iterable[InventoryRow]) -> str:
    """Fixed-width text table: #, method, type, setting, granularity, methodology, BL, Ev., status."""
    header = ("#", "Method", "Type", "Setting", "Gran.", "Methodology", "BL", "Ev.", "Status/registry")
    body = []
    for r in rows:
        status = f"{status_text(r)} ({r.registry_name})" if r.status == "implemented" else r.status
        body.append((
            "" if r.number is None else str(r.number),
            r.method,
            r.type or "—",
            "/".join(r.setting),
            r.granularity,
            r.methodology,
            r.baseline_family or "—",
            r.evidence,
            status,
        ))
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = [fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(b) for b in body]
    return "\n".join(lines) + "\n"


def render_extras(extras: Iterable[dict[str, Any]]) -> str:
    """The registry methods that are not reviewed papers (baselines, the oracle), one line each
    with their status (``implemented (simplified: <what>)`` where they carry a note)."""
    extras = list(extras)
    if not extras:
        return ""
    w = max(len(e["registry_name"]) for e in extras)
    lines = ["Registry methods beyond the inventory (baselines and benchmark instruments):"]
    for e in extras:
        status = f"implemented (simplified: {e['simplified']})" if e.get("simplified") else "implemented"
        lines.append(f"  {e['registry_name'].ljust(w)}  {e['method']} — {status}")
    return "\n".join(lines) + "\n"


def check_against_registry(
    rows: Iterable[InventoryRow],
    registry_names: Iterable[str],
    extras: Optional[Iterable[dict[str, Any]]] = None,
) -> list[str]:
    """Problems between the inventory and the credit registry (empty list = consistent).

    Reports: an ``implemented`` row whose ``registry_name`` is not registered; a row that is not
    implemented and gives no ``status_reason``; an unknown ``status``; a registered name that is
    neither some row's ``registry_name`` nor listed in ``registry_extras``. ``extras`` defaults to
    the ``registry_extras`` of ``data/inventory.json``.
    """
    rows = list(rows)
    names = list(registry_names)
    known = set(names)
    if extras is None:
        extras = load_registry_extras()
    extra_names = {e.get("registry_name") for e in extras}
    problems = []
    for r in rows:
        label = f"#{r.number} {r.method}" if r.number is not None else f"background {r.method}"
        if r.status not in STATUSES:
            problems.append(f"{label}: unknown status {r.status!r} (expected one of {', '.join(STATUSES)})")
        if r.status == "implemented":
            if not r.registry_name:
                problems.append(f"{label}: status implemented but no registry_name")
            elif r.registry_name not in known:
                problems.append(f"{label}: status implemented but registry_name {r.registry_name!r} is not registered")
            if r.simplified and not r.simplified.strip():
                problems.append(f"{label}: blank 'simplified' note")
        elif r.simplified:
            problems.append(f"{label}: status {r.status!r} with a 'simplified' note (only implemented rows have one)")
        elif not r.status_reason.strip():
            problems.append(f"{label}: status {r.status!r} without a status_reason")
    row_names = {r.registry_name for r in rows if r.registry_name}
    for n in names:
        if n not in row_names and n not in extra_names:
            problems.append(f"registry method {n!r} is neither an inventory row's registry_name nor in registry_extras")
    return problems
