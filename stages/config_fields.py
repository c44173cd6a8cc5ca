"""Config fields that carry their own help and rule: every config rule is declared once, at its field.

This module is how every config field of creditflow is written (stages/, environments/ and flows/
alike; it imports nothing from flows, prefect or mlflow). A field is declared with :func:`param`
instead of a bare default and a trailing ``# comment``::

    @dataclass
    class VinePPOConfig(CreditConfig):
        k: int = param(4, help="MC continuations per step boundary (VinePPO §3.1.1)", ge=1)
        partition: str = param("step", help="where values are estimated", choices=("step", "token"))
        lr: float = param(1e-3, help="learning rate", gt=0)   # floats are finite unless finite=False

        def config_rules(self):                      # optional: rules between fields of this class
            if self.num_decisive > self.horizon:
                yield "num_decisive", "must be <= env.horizon"

The help and the rule live in ``dataclasses.field(metadata=...)`` (cf. TRL's
``field(metadata={"help": ...})`` and pydantic's ``Field(ge=...)``), so they are read by

* :func:`check` — walks a config dataclass instance (nested dataclasses too), checks every field
  against its rule, rejects non-finite floats everywhere (also in fields declared without
  :func:`param`), and calls each instance's optional ``config_rules()`` hook for rules between
  fields. It returns :class:`Problem` records (key, value, rule); the run config's loader
  (``flows/config.py::load_config``) turns the first into the one line
  ``creditflow: config error: <key>=<value>: <rule>`` before a run id exists;
* :func:`describe` — key, type, default, rule and help of every field (``creditflow config describe``).

Rules are: ``choices`` (a tuple of allowed values, or a callable returning them when a registry
derives them, e.g. ``update.loss`` from :func:`stages.update.loss_registry.loss_names`), bounds ``ge``/``gt``/``le``/``lt``, ``finite``
(floats, on by default), ``subset_of`` (a comma-separated subset of given words, e.g. ``kinds``),
``multiple_of`` and ``check`` (a callable returning an error text or None, with ``rule`` its
description). ``None`` satisfies every rule of an ``Optional`` field. Rules that need the outside
world (a model directory exists, Docker is reachable) are not field rules: they stay explicit
checks in the loader, reported in the same one-line format.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

#: metadata key of a field's rule (a :class:`Rule`)
RULE_KEY = "creditflow_rule"
#: metadata key of a field's help text (same key as TRL / HF argument dataclasses)
HELP_KEY = "help"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One violated rule: the config key (dotted), its value and the rule it breaks."""

    key: str
    value: Any
    rule: str

    def line(self) -> str:
        """``<key>=<value>: <rule>`` (the body of the CLI's one-line config error)."""
        return f"{self.key}={format_value(self.value)}: {self.rule}"


def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if (value == "" or " " in value) else value
    return str(value)


def _fmt(x: Any) -> str:
    return format_value(x)


@dataclasses.dataclass(frozen=True)
class Rule:
    """The rule of one field (see the module docstring). ``describe()`` says it in words."""

    #: allowed values: a tuple, or a zero-argument callable returning them (read at each use, so the
    #: values a registry holds, test-registered entries included, are the allowed ones)
    choices: Optional[tuple | Callable[[], Sequence]] = None
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    finite: bool = True
    subset_of: Optional[tuple] = None
    multiple_of: Optional[int] = None
    check: Optional[Callable[[Any], Optional[str]]] = None
    text: Optional[str] = None  # description of ``check`` (or an override of the generated one)

    def allowed(self) -> Optional[tuple]:
        """The allowed values of ``choices`` now (a callable ``choices`` is called), or None."""
        if self.choices is None:
            return None
        return tuple(self.choices()) if callable(self.choices) else self.choices

    def describe(self, type_name: str = "") -> str:
        if self.text and self.check is None:
            return self.text
        parts: list[str] = []
        allowed = self.allowed()
        if allowed is not None:
            parts.append("one of " + ", ".join(_fmt(c) for c in allowed))
        if self.subset_of is not None:
            parts.append("a comma-separated subset of " + ", ".join(self.subset_of))
        bounds = []
        if self.ge is not None:
            bounds.append(f">= {_fmt(self.ge)}")
        if self.gt is not None:
            bounds.append(f"> {_fmt(self.gt)}")
        if self.le is not None:
            bounds.append(f"<= {_fmt(self.le)}")
        if self.lt is not None:
            bounds.append(f"< {_fmt(self.lt)}")
        if bounds:
            noun = {"int": "an integer", "float": "a finite number" if self.finite else "a number"}.get(type_name, "a value")
            parts.append(f"{noun} " + " and ".join(bounds))
        elif type_name == "float" and self.finite:
            parts.append("a finite number")
        if self.multiple_of:
            parts.append(f"0 or a multiple of {self.multiple_of}")
        said = "must be " + "; ".join(parts) if parts else ""
        if self.text:
            said = f"{said}; {self.text}" if said else self.text
        return said

    def violation(self, value: Any, type_name: str = "") -> Optional[str]:
        """The rule's description when ``value`` breaks it, else None."""
        if value is None:
            return None
        if isinstance(value, float) and self.finite and not math.isfinite(value):
            return self.describe(type_name) or "must be a finite number"
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            return self.describe(type_name)
        if self.subset_of is not None:
            items = [s.strip() for s in str(value).split(",")]
            if not items or any(s not in self.subset_of for s in items):
                return self.describe(type_name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if ((self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
                    or (self.le is not None and not value <= self.le) or (self.lt is not None and not value < self.lt)):
                return self.describe(type_name)
            if self.multiple_of and (value < 0 or value % self.multiple_of):
                return self.describe(type_name)
        if self.check is not None:
            err = self.check(value)
            if err:
                return err
        return None


def param(default: Any = MISSING, *, help: str, choices: Optional[Sequence | Callable[[], Sequence]] = None,
          ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
          lt: Optional[float] = None, finite: bool = True,
          subset_of: Optional[Sequence[str]] = None, multiple_of: Optional[int] = None,
          check: Optional[Callable[[Any], Optional[str]]] = None, rule: Optional[str] = None,
          default_factory: Any = MISSING) -> Any:
    """A dataclass field with its ``help`` and rule in ``metadata`` (see the module docstring)."""
    if choices is not None and not callable(choices):
        choices = tuple(choices)
    r = Rule(choices=choices, ge=ge, gt=gt, le=le, lt=lt, finite=finite,
             subset_of=tuple(subset_of) if subset_of is not None else None, multiple_of=multiple_of,
             check=check, text=rule)
    meta = {HELP_KEY: help, RULE_KEY: r}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_help(f: dataclasses.Field) -> str:
    return str(f.metadata.get(HELP_KEY, ""))


def field_rule(f: dataclasses.Field) -> Rule:
    return f.metadata.get(RULE_KEY) or Rule()


def _type_name(cls: type, f: dataclasses.Field) -> str:
    try:
        hints = typing.get_type_hints(cls)
        tp = hints.get(f.name, f.type)
    except Exception:
        tp = f.type
    if isinstance(tp, str):
        return tp.replace("Optional[", "").rstrip("]")
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        tp = args[0]
    return getattr(tp, "__name__", str(tp))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check(obj: Any, prefix: str = "", world: bool = False) -> list[Problem]:
    """Every broken rule of config dataclass ``obj`` (nested dataclasses too), keys prefixed ``prefix``.

    Non-finite floats are rejected in every field, ``param`` or not; each dataclass's optional
    ``config_rules()`` hook yields ``(field_name, rule)`` pairs for rules between its fields; with
    ``world=True`` the optional ``world_rules()`` hooks too (rules that look outside: files, env vars)."""
    problems: list[Problem] = []
    if not dataclasses.is_dataclass(obj):
        return problems
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            problems.extend(check(value, key, world))
            continue
        err = field_rule(f).violation(value, _type_name(type(obj), f))
        if err:
            problems.append(Problem(key, value, err))
    hooks = ("config_rules", "world_rules") if world else ("config_rules",)
    for hook_name in hooks:
        hook = getattr(obj, hook_name, None)
        if callable(hook) and not problems:
            for name, rule in hook() or ():
                problems.append(Problem(_join(prefix, name), getattr(obj, name, None), rule))
    return problems


def check_dataclass(obj: Any, prefix: str = "") -> None:
    """Raise ``ValueError`` with the first problem's line (for objects built outside the run config)."""
    problems = check(obj, prefix)
    if problems:
        raise ValueError(problems[0].line())


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    key: str
    type: str
    default: Any
    rule: str
    help: str


def describe(cls: type, prefix: str = "") -> list[FieldDoc]:
    """Key, type, default, rule and help of every field of config dataclass ``cls`` (nested too)."""
    out: list[FieldDoc] = []
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if f.default_factory is not MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = f.default
        if dataclasses.is_dataclass(default):
            out.extend(describe(type(default), key))
            continue
        tname = _type_name(cls, f)
        out.append(FieldDoc(key, tname, default, field_rule(f).describe(tname), field_help(f)))
    return out


def undocumented(cls: type, prefix: str = "") -> Iterator[str]:
    """Keys of fields of ``cls`` (nested too) without help metadata."""
    for d in describe(cls, prefix):
        if not d.help.strip():
            yield d.key


def render(docs: Iterable[FieldDoc]) -> str:
    lines = []
    for d in docs:
        rule = f"  [{d.rule}]" if d.rule else ""
        lines.append(f"{d.key} ({d.type}, default {format_value(d.default)}){rule}\n    {d.help}")
    return "\n".join(lines)
