"""Run configuration: OmegaConf structured schema, config groups, dotlist overrides, validation.

``creditflow train credit=gae update.lr=1e-5 env=bifurcation iterations=20 seed=3``

* ``group=option`` (no dot; group one of :data:`GROUPS`) selects ``configs/<group>/<option>.yaml``.
  For ``credit`` and ``env`` the registry is the source of truth: any registered method / task
  family can be selected even without a YAML file.
* ``a.b=value`` is an OmegaConf dotlist override.
* The schema is structured and closed: an unknown key or a value of the wrong type is rejected
  with a message naming the key, before any compute starts. The ``credit`` node's schema is the
  selected method's own ``Config`` dataclass, the ``env`` node's the selected family's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from environments.base import EnvConfig, get_family_class
from environments.sandbox.base import SandboxConfig
from stages.credit.base import CreditConfig, get_method_class
from stages.rollout.config import ModelConfig, RolloutConfig
from stages.update.config import UpdateConfig
from flows.scaleout import RunnerConfig, validate_runner

#: config groups under configs/
GROUPS = ("model", "env", "credit", "update", "experiment")
#: config sections whose values change what training computes (they enter the config hash)
HASHED_SECTIONS = ("seed", "model", "env", "sandbox", "rollout", "credit", "update")


class ConfigError(ValueError):
    """A bad configuration, reported before any compute starts."""


@dataclass
class TrackingConfig:
    """Keys allowed under ``tracking.``."""

    mlflow_uri: Optional[str] = None  # MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///$CREDITFLOW_HOME/mlflow.db
    experiment: str = "creditflow"  # MLflow experiment name
    heatmap_every: int = 5  # log a credit heatmap PNG every N iterations (and at the last one)
    retry_seconds: float = 300.0  # how long an unreachable tracking store is retried (metrics buffered in runs/<id>/tracking_buffer.jsonl) before the run fails


@dataclass
class ReportConfig:
    """Keys allowed under ``report.``: reporting-checklist fields that cannot be measured (Appendix C)."""

    baseline_run: Optional[str] = None  # run id of the episode-level baseline run this run is compared with
    ablation_of: Optional[str] = None  # run id of the full method this run ablates (CA-component ablation)
    notes: str = ""  # free text recorded with the run


@dataclass
class DebugConfig:
    """Keys allowed under ``debug.`` (never part of the config hash)."""

    crash_at: Optional[str] = None  # inject a fault: "ITER:STAGE" raises, "ITER:STAGE:kill" SIGKILLs the process


@dataclass
class TrainConfig:
    """The whole run. Every field has a default; ``creditflow config show`` prints the resolved tree."""

    seed: int = 0  # master seed; every stage derives its own generator from (seed, iteration, stage)
    iterations: int = 10  # training iterations (each runs the five stages)
    eval_episodes: int = 64  # eval-split episodes for the success rate before/after training
    eval_every: int = 0  # also evaluate every N iterations (0 = only before and after)
    eval_temperature: float = 1.0  # sampling temperature at evaluation
    run_name: Optional[str] = None  # human-readable name shown in MLflow
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)  # where rollout shards run (flows/scaleout.py)


def configs_dir() -> Path:
    """The ``configs/`` directory (``CREDITFLOW_CONFIGS`` overrides)."""
    env = os.environ.get("CREDITFLOW_CONFIGS")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "configs"
    if not path.is_dir():
        raise ConfigError(f"configs directory not found at {path} (set CREDITFLOW_CONFIGS)")
    return path


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (configs_dir() / group).glob("*.yaml"))


def _load_yaml(path: Path) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping")
    return node


def _group_node(group: str, option: str) -> DictConfig:
    path = configs_dir() / group / f"{option}.yaml"
    if path.is_file():
        return _load_yaml(path)
    # registry-backed groups accept any registered name without a YAML file
    if group == "credit":
        _check_registered("credit", option)
        return OmegaConf.create({"method": option})
    if group == "env":
        _check_registered("env", option)
        return OmegaConf.create({"name": option})
    raise ConfigError(
        f"unknown {group} option {option!r}; available: {', '.join(group_options(group)) or '(none)'}"
    )


def _check_registered(group: str, name: str) -> type:
    try:
        return get_method_class(name) if group == "credit" else get_family_class(name)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None


def _split_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    groups: dict[str, str] = {}
    dotlist: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. credit=gae, update.lr=1e-5)")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in GROUPS:
            groups[key] = value.strip()
        elif key in ("credit.method", "env.name"):
            # selecting another method/family re-selects the group (its own keys and defaults)
            groups[key.split(".")[0]] = value.strip()
        else:
            dotlist.append(f"{key}={value}")
    return groups, dotlist


def _schema_for(choices: dict[str, str]) -> DictConfig:
    schema = OmegaConf.structured(TrainConfig)
    method_cls = _check_registered("credit", choices["credit"])
    family_cls = _check_registered("env", choices["env"])
    with open_dict(schema):
        schema.credit = OmegaConf.structured(method_cls.Config)
        schema.env = OmegaConf.structured(family_cls.Config)
    OmegaConf.set_struct(schema, True)
    return schema


def _friendly(exc: OmegaConfBaseException, schema: DictConfig) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).split("\n")[0]
    if isinstance(exc, ConfigKeyError) or "not in" in msg:
        parent, _, leaf = key.rpartition(".")
        try:
            node = OmegaConf.select(schema, parent) if parent else schema
            allowed = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else ""
        except Exception:
            allowed = ""
        where = f" under '{parent}'" if parent else " at top level"
        return ConfigError(f"unknown config key '{key}'" + (f"; allowed{where}: {allowed}" if allowed else ""))
    if isinstance(exc, ValidationError):
        return ConfigError(f"wrong type for config key '{key}': {msg}")
    return ConfigError(f"config key '{key}': {msg}")


def load_config(overrides: Optional[list[str]] = None, base: Optional[DictConfig] = None) -> DictConfig:
    """Resolve ``configs/base.yaml`` + groups + ``overrides`` against the schema.

    ``base`` (a previously resolved config, e.g. of a run being resumed) replaces base.yaml and
    the group defaults. Raises :class:`ConfigError` naming the offending key.
    """
    overrides = list(overrides or [])
    group_choices, dotlist = _split_overrides(overrides)
    if base is None:
        base_node = _load_yaml(configs_dir() / "base.yaml")
        defaults = dict(base_node.pop("defaults", {}) or {})
        if "experiment" in group_choices:
            exp = _group_node("experiment", group_choices["experiment"])
            defaults.update(dict(exp.pop("defaults", {}) or {}))
            exp_body: Optional[DictConfig] = exp
        else:
            exp_body = None
        choices = {g: defaults.get(g) for g in GROUPS if g != "experiment"}
        choices.update({g: v for g, v in group_choices.items() if g != "experiment"})
        layers: list[Any] = [base_node]
        for g in ("model", "env", "credit", "update"):
            if choices.get(g):
                layers.append({g: _group_node(g, choices[g])})
        if exp_body is not None:
            layers.append(exp_body)
    else:
        if group_choices:
            raise ConfigError(
                f"config groups ({', '.join(sorted(group_choices))}) cannot be changed for an existing run; "
                "start a new run instead"
            )
        base_dict = OmegaConf.to_container(base, resolve=True)
        choices = {"credit": base_dict["credit"]["method"], "env": base_dict["env"]["name"]}
        layers = [base_dict]
    # a later layer may re-select credit/env; the final choice decides the schema
    layers = [OmegaConf.to_container(OmegaConf.create(layer)) for layer in layers]
    for node in layers:
        if isinstance(node.get("credit"), dict) and "method" in node["credit"]:
            choices["credit"] = node["credit"]["method"]
        if isinstance(node.get("env"), dict) and "name" in node["env"]:
            choices["env"] = node["env"]["name"]
    choices.setdefault("credit", CreditConfig.method)
    choices.setdefault("env", EnvConfig.name)
    schema = _schema_for({"credit": choices["credit"] or "grpo", "env": choices["env"] or "bifurcation"})
    try:
        cfg = schema
        for layer in layers:
            cfg = OmegaConf.merge(cfg, layer)
        if dotlist:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as exc:
        raise _friendly(exc, schema) from None
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def _validate_vllm(cfg: DictConfig) -> None:
    """rollout.engine=vllm: fail before any compute when the engine cannot run."""
    from stages.rollout.vllm_engine import CPU_HEAD_SIZES, INSTALL_HINT, vllm_available

    r = cfg.rollout
    if r.vllm_url is not None and not str(r.vllm_url).startswith(("http://", "https://")):
        raise ConfigError(f"config key 'rollout.vllm_url' must start with http:// or https://, got {r.vllm_url!r}")
    if r.vllm_url is None and not vllm_available():
        raise ConfigError(f"config key 'rollout.engine' is vllm but the vllm package is not installed: {INSTALL_HINT}")
    if r.vllm_entropy_topk < 0:
        raise ConfigError(f"config key 'rollout.vllm_entropy_topk' must be >= 0, got {r.vllm_entropy_topk}")
    if not 0 < r.vllm_gpu_memory_utilization <= 1:
        raise ConfigError(f"config key 'rollout.vllm_gpu_memory_utilization' must be in (0, 1], got {r.vllm_gpu_memory_utilization}")
    if r.vllm_kv_cache_gib <= 0 or r.vllm_max_num_seqs < 1:
        raise ConfigError("config keys 'rollout.vllm_kv_cache_gib' and 'rollout.vllm_max_num_seqs' must be > 0")
    if r.vllm_block_size < 0 or r.vllm_block_size % 16:
        raise ConfigError(f"config key 'rollout.vllm_block_size' must be 0 (engine default) or a positive multiple of 16 "
                          f"(32 on CPU), got {r.vllm_block_size}")
    if r.vllm_url is None and cfg.model.path is None and cfg.model.device != "cuda":
        import torch

        if not (cfg.model.device == "auto" and torch.cuda.is_available()):
            head_dim = cfg.model.hidden_size // max(cfg.model.num_heads, 1)
            if head_dim not in CPU_HEAD_SIZES:
                raise ConfigError(
                    f"rollout.engine=vllm on CPU: vLLM's CPU attention supports head sizes {list(CPU_HEAD_SIZES)}, the "
                    f"tiny model has head_dim = model.hidden_size / model.num_heads = {head_dim}; set e.g. "
                    f"model.num_heads={max(1, cfg.model.hidden_size // 32)} model.num_kv_heads=1"
                )


def validate(cfg: DictConfig) -> None:
    """Semantic checks that the type schema cannot express (ranges, existing paths, choices)."""

    def positive(key: str, allow_zero: bool = False) -> None:
        value = OmegaConf.select(cfg, key)
        if value is None or value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"config key '{key}' must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

    for key in ("iterations", "rollout.group_size", "rollout.tasks_per_iteration", "rollout.max_new_tokens_per_turn",
                "update.minibatch_size", "update.epochs", "update.lr", "model.hidden_size", "eval_episodes"):
        positive(key)
    for key in ("update.kl_coef", "update.max_grad_norm", "update.clip_ratio", "rollout.temperature",
                "eval_every", "model.warmup_steps", "eval_temperature"):
        positive(key, allow_zero=True)
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"config key 'rollout.top_p' must be in (0, 1], got {cfg.rollout.top_p}")
    if cfg["update"].loss not in ("grpo", "ppo"):  # (cfg.update is the Mapping method)
        raise ConfigError(f"config key 'update.loss' must be one of grpo, ppo; got {cfg['update'].loss!r}")
    if cfg.rollout.engine not in ("hf", "vllm"):
        raise ConfigError(
            f"config key 'rollout.engine': {cfg.rollout.engine!r} is not available; implemented engines: hf, vllm"
        )
    if cfg.rollout.engine == "vllm":
        _validate_vllm(cfg)
    if cfg.sandbox.backend not in ("process", "docker", "auto"):
        raise ConfigError(f"config key 'sandbox.backend' must be process, docker or auto; got {cfg.sandbox.backend!r}")
    if cfg.sandbox.isolation not in ("auto", "bwrap", "none"):
        raise ConfigError(f"config key 'sandbox.isolation' must be auto, bwrap or none; got {cfg.sandbox.isolation!r}")
    if cfg.sandbox.snapshot_mode not in ("archive", "commit"):
        raise ConfigError(f"config key 'sandbox.snapshot_mode' must be archive or commit; got {cfg.sandbox.snapshot_mode!r}")
    if cfg.sandbox.docker_exec not in ("resident", "exec"):
        raise ConfigError(f"config key 'sandbox.docker_exec' must be resident or exec; got {cfg.sandbox.docker_exec!r}")
    if cfg.sandbox.backend == "docker":
        # Docker asked for explicitly: the engine must be reachable before any compute starts
        from environments.sandbox import SandboxUnavailable, check_docker

        try:
            check_docker(OmegaConf.to_object(cfg.sandbox))
        except SandboxUnavailable as exc:
            raise ConfigError(f"config key 'sandbox.backend' is docker: {exc}") from None
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config key 'model.dtype' must be float32, bfloat16 or float16; got {cfg.model.dtype!r}")
    if cfg.model.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"config key 'model.device' must be auto, cpu or cuda; got {cfg.model.device!r}")
    if cfg.model.path is not None:
        path = Path(os.path.expanduser(cfg.model.path))
        if not path.is_dir():
            raise ConfigError(f"config key 'model.path': model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise ConfigError(f"config key 'model.path': {path} has no config.json (not a Hugging Face model directory)")
    if cfg.debug.crash_at is not None:
        parse_crash_at(cfg.debug.crash_at)
    for message in validate_runner(cfg.runner):
        raise ConfigError(message)


STAGES = ("env", "rollout", "reward", "credit", "update", "checkpoint", "eval", "prepare")


def parse_crash_at(spec: str) -> tuple[int, str, str]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or parts[1] not in STAGES or (
        len(parts) == 3 and parts[2] not in ("raise", "kill")
    ):
        raise ConfigError(
            f"config key 'debug.crash_at' must look like ITER:STAGE or ITER:STAGE:kill with STAGE in "
            f"{', '.join(STAGES)}; got {spec!r}"
        )
    return int(parts[0]), parts[1], parts[2] if len(parts) == 3 else "raise"


def to_object(cfg: DictConfig) -> TrainConfig:
    """The resolved config as typed dataclasses (credit/env nodes as the selected classes)."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def config_hash(cfg: DictConfig) -> str:
    """Hash of the sections that change what training computes (not iterations, tracking, debug)."""
    data = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
            for k in HASHED_SECTIONS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(cfg: DictConfig) -> dict[str, str]:
    """``{"update.lr": "0.001", ...}`` for MLflow params."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = "null" if node is None else str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
