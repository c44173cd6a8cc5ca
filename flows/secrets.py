"""Secrets: API keys live in the environment, never in configs, MLflow, logs or run directories.

The config holds only the *name* of an environment variable (keys ending in ``_env``, e.g.
``credit.judge_api_key_env: CREDITFLOW_JUDGE_API_KEY``); the value is read where it is used
(:mod:`stages.reward.judge`) and nowhere else. Everything creditflow writes out goes through the
masks of this module as a second line of defence, because values still find their way into text:
an exception message that quotes a request, a ``${oc.env:...}`` interpolation in ``report.notes``
or ``run_name``, a tracking URI with ``user:password@``.

Which variables are secret (:func:`secret_env_names`):

* every variable of the environment whose name matches :data:`SECRET_NAME_PATTERNS`
  (``*_API_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*_SECRET_*``, ``*PASSWORD*``; case-insensitive);
* every variable *named* by a config key ending in ``_env`` (:func:`referenced_env_names`), of the
  config passed in or of any config registered with :func:`register_config` in this process;
* names registered with :func:`register_env_names`.

What is masked:

* :func:`mask_text` — the *values* of those variables (at least :data:`MIN_SECRET_LENGTH`
  characters; shorter ones would mangle unrelated text) and the password of ``scheme://user:pw@``
  URLs become ``***``;
* :func:`mask_config` — a (nested or flattened) config mapping: the value of every secret *key*
  (:func:`is_secret_key`: ``api_key``, ``token``, ``secret``, ``password`` ... but not ``*_env``,
  which hold names) becomes ``***``, every string goes through :func:`mask_text`;
* :class:`SecretFilter` — a :mod:`logging` filter doing :func:`mask_text` on every record
  (message, arguments and traceback); :func:`install_log_filter` puts it on the handlers of the
  root, ``prefect`` and ``mlflow`` loggers (Prefect's API log handler included);
* :func:`masked_std_streams` — ``sys.stdout`` / ``sys.stderr`` through :func:`mask_text`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import sys
from typing import Any, Iterable, Iterator, Mapping, Optional

MASK = "***"
#: environment variable names whose values are secrets (fnmatch, case-insensitive)
SECRET_NAME_PATTERNS = ("*_API_KEY", "*_TOKEN", "*_SECRET", "*_SECRET_*", "*PASSWORD*")
#: values shorter than this are not masked in free text (masking "1" or "abc" would mangle logs)
MIN_SECRET_LENGTH = 6
#: leaf names of config keys whose *values* are secrets (a key ending in ``_env`` holds a name: not secret)
_SECRET_KEY_RE = re.compile(r"(^|_)(api_?key|token|secret|secret_key|password|passwd|credentials?)$", re.IGNORECASE)
_URL_PASSWORD_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]+:)(?P<pw>[^\s@/]+)(?P<at>@)")

_registered_names: set[str] = set()


# ------------------------------------------------------------------------------------ names
def is_secret_name(name: str) -> bool:
    """Does the environment variable ``name`` hold a secret by its name alone?"""
    upper = name.upper()
    return any(fnmatch.fnmatchcase(upper, pattern) for pattern in SECRET_NAME_PATTERNS)


def is_secret_key(key: str) -> bool:
    """Is the value of config key ``key`` (dotted or leaf) a secret? ``credit.judge_api_key`` yes,
    ``credit.judge_api_key_env`` no (it holds the variable's name, which is safe to record)."""
    leaf = str(key).rsplit(".", 1)[-1]
    if leaf.lower().endswith("_env"):
        return False
    return bool(_SECRET_KEY_RE.search(leaf))


def referenced_env_names(cfg: Any) -> set[str]:
    """Names held by config keys ending in ``_env`` (nested mapping, flattened mapping or DictConfig)."""
    out: set[str] = set()

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, key)
        elif key.lower().endswith("_env") and isinstance(node, str) and node.strip():
            out.add(node.strip())

    walk(_plain(cfg), "")
    return out


def register_config(cfg: Any) -> set[str]:
    """Remember the variables named by ``cfg``'s ``*_env`` keys for every mask of this process."""
    names = referenced_env_names(cfg)
    _registered_names.update(names)
    return names


def register_env_names(names: Iterable[str]) -> None:
    _registered_names.update(n for n in names if n)


def secret_env_names(cfg: Any = None, environ: Optional[Mapping[str, str]] = None) -> set[str]:
    """All variable names whose values are masked: by pattern, by ``cfg``'s ``*_env`` keys, registered."""
    environ = os.environ if environ is None else environ
    names = {n for n in environ if is_secret_name(n)} | _registered_names
    if cfg is not None:
        names |= referenced_env_names(cfg)
    return names


def secret_values(cfg: Any = None, environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """The values to mask, longest first (so a value containing another is masked whole)."""
    environ = os.environ if environ is None else environ
    values = {environ.get(n) or "" for n in secret_env_names(cfg, environ)}
    return sorted((v for v in values if len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True)


# ------------------------------------------------------------------------------------ masks
def mask_text(text: Any, cfg: Any = None, values: Optional[Iterable[str]] = None) -> Any:
    """``text`` with every secret value and every ``://user:password@`` password replaced by ``***``.
    Non-strings are returned unchanged. ``values`` replaces the lookup (for tests and hot loops)."""
    if not isinstance(text, str) or not text:
        return text
    for value in secret_values(cfg) if values is None else values:
        if value and value in text:
            text = text.replace(value, MASK)
    if "://" in text:
        text = _URL_PASSWORD_RE.sub(lambda m: m.group("head") + MASK + m.group("at"), text)
    return text


def mask_config(data: Any, cfg: Any = None) -> Any:
    """A copy of ``data`` (mapping, nested or flattened like :func:`flows.config.flatten`'s output;
    an OmegaConf DictConfig is converted without resolving) with secret keys' values replaced by
    ``***`` and every string masked by :func:`mask_text`. ``cfg`` adds its ``*_env`` names (by
    default those of ``data`` itself)."""
    plain = _plain(data)
    values = secret_values(plain if cfg is None else cfg)

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, Mapping):
            return {k: walk(v, str(k)) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(walk(v, key) for v in node)
        if key and is_secret_key(key) and node not in (None, "", "null"):
            return MASK
        return mask_text(node, values=values)

    return walk(plain, "")


def _plain(data: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(data, (DictConfig, ListConfig)):
            return OmegaConf.to_container(data, resolve=False)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return data


# ------------------------------------------------------------------------------------ logging
class SecretFilter(logging.Filter):
    """Masks secret values in every record it sees (message with its arguments, and traceback).

    Put it on *handlers* (records propagated from child loggers pass handler filters, not the
    parent logger's); :func:`install_log_filter` does that. Never drops a record."""

    def __init__(self, cfg: Any = None):
        super().__init__()
        if cfg is not None:
            register_config(cfg)

    def filter(self, record: logging.LogRecord) -> bool:
        values = secret_values()
        if not values and "://" not in str(record.msg):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to fix
            return True
        masked = mask_text(message, values=values)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_text(record.exc_text, values=values)
        if getattr(record, "stack_info", None):
            record.stack_info = mask_text(record.stack_info, values=values)
        return True


_FILTER = SecretFilter()


def install_log_filter(cfg: Any = None, loggers: Iterable[str] = ("", "prefect", "mlflow")) -> SecretFilter:
    """Add the process-wide :class:`SecretFilter` to the named loggers, their handlers and the
    handlers of every configured ``prefect.*`` logger (idempotent; call again after Prefect
    reconfigured logging, e.g. at the start of a flow run)."""
    if cfg is not None:
        register_config(cfg)
    targets: list[logging.Logger] = [logging.getLogger(name) for name in loggers]
    for name, obj in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(obj, logging.Logger) and (name.startswith("prefect") or name.startswith("mlflow")):
            targets.append(obj)
    for lg in targets:
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
        for handler in lg.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    return _FILTER


# ------------------------------------------------------------------------------------ streams
class MaskingStream:
    """A text stream wrapper that masks what is written (line-oriented callers such as ``print``)."""

    def __init__(self, inner: Any):
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(mask_text(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextlib.contextmanager
def masked_std_streams(cfg: Any = None) -> Iterator[None]:
    """``sys.stdout`` / ``sys.stderr`` masked for the duration (the CLI wraps its commands in it)."""
    if cfg is not None:
        register_config(cfg)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = MaskingStream(out), MaskingStream(err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
