"""The benchmark metadata format (survey §9.5, "Benchmark protocol schema: JSON schema files for the
proposed benchmark metadata format"), shipped as ``metadata.schema.json`` next to this module.

One document describes one training run (a benchmark cell is a training run): the task profile,
the method with its Appendix B taxonomy labels and granularity, baselines, model, seeds, measured
compute (generated / forward tokens, CA overhead, wall and CPU seconds), credit accuracy against
ground truth where the task has it, results with 95% intervals, the Appendix C checklist answers
(Table 11), software versions, git commit and config hash. :func:`validate` checks a document
against the schema and raises :class:`MetadataError` naming every offending field, its value and
the rule; :func:`finite_or_none` turns NaN/inf (which JSON cannot hold) into ``null`` first.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from typing import Any

SCHEMA_VERSION = "1"
_RESOURCE = "metadata.schema.json"


class MetadataError(ValueError):
    """A metadata document does not validate; the message lists each field, value and rule."""


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) shipped as package data of :mod:`stages.benchmark`."""
    return json.loads(resources.files(__package__).joinpath(_RESOURCE).read_text(encoding="utf-8"))


def _validator() -> Any:
    import jsonschema

    cls = jsonschema.Draft202012Validator
    return cls(load_schema(), format_checker=cls.FORMAT_CHECKER)


def _where(path: Any) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(document)"


def _innermost(err: Any) -> Any:
    """Of a ``oneOf`` failure (e.g. neither null nor a valid object), the branch error deepest in
    the document, preferring a broken rule over a mere type mismatch (the null branch)."""
    while err.context:
        err = max(err.context, key=lambda e: (len(e.absolute_path), e.validator != "type"))
    return err


def errors(doc: Any) -> list[str]:
    """Every violation of the schema, one line each (``field: value: rule``), in document order."""
    lines = []
    for err in sorted(_validator().iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        leaf = _innermost(err)
        value = json.dumps(leaf.instance, default=str)
        value = value if len(value) <= 60 else value[:57] + "..."
        rule = leaf.message
        if rule.startswith(repr(leaf.instance)):  # "<value> is too short": the value is printed once, shortened
            rule = rule[len(repr(leaf.instance)):].lstrip()
        rule = rule if len(rule) <= 160 else rule[:157] + "..."
        where = _where(leaf.absolute_path)
        lines.append(f"{where}: {rule}" if leaf.validator in ("required", "additionalProperties") else f"{where}: {value}: {rule}")
    return lines


def validate(doc: Any) -> None:
    """Raise :class:`MetadataError` if ``doc`` does not validate against the schema."""
    found = errors(doc)
    if found:
        more = f" (+{len(found) - 5} more)" if len(found) > 5 else ""
        raise MetadataError("metadata does not validate against metadata.schema.json: " + "; ".join(found[:5]) + more)


def finite_or_none(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples) with every non-finite float replaced by ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj
