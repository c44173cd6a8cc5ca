"""Config of ``creditflow benchmark``: methods x tasks x seeds x learning rates at a fixed budget.

``configs/benchmark/<name>.yaml`` (or any YAML path) + OmegaConf dotlist overrides, e.g.::

    creditflow benchmark bifurcation_small seeds=2 'methods=[grpo,oracle]' budget.env_steps=400

Every key is a field with its help and rule (:mod:`stages.config_fields`). Before anything is
created the whole grid is resolved: each (task, method) is loaded as a training config
(:func:`flows.config.load_config`), so an unknown method, a method that cannot learn on a task
(:func:`flows.config.check_learnable`: e.g. the oracle needs an exact MDP) or a bad budget is one
line ``creditflow: config error: <key>=<value>: <rule>``.

A cell is one training run: the common ``overrides``, then the task's, ``credit=<method>``, the
method's ``method_overrides``, the cell's ``cell_overrides`` (glob patterns on the cell id), then
``seed``, ``update.lr``, ``iterations=max_iterations`` and the ``budget.*`` keys.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flows.config import ConfigError, _friendly, _load_yaml, configs_dir, load_config, problem_error
from flows.runner_config import RunnerConfig
from stages.benchmark.budget import BUDGET_KEYS, BudgetConfig
from stages.config_fields import check, param

#: what "compute" means on the x axis of the curves and in compute-to-target
COMPUTE_MEASURES = ("forward_tokens", "generated_tokens", "env_steps", "wall_seconds")


def _methods_problem(methods: list[str]) -> Optional[str]:
    from stages.credit.registry import method_names

    known = method_names()
    if not methods:
        return "must name at least one credit method"
    bad = [m for m in methods if m not in known]
    if bad:
        return f"unknown credit method {bad[0]!r}; known: {', '.join(known)}"
    if len(set(methods)) != len(methods):
        return "must not name a method twice"
    return None


def _lrs_problem(lrs: list[float]) -> Optional[str]:
    if not lrs:
        return "must hold at least one learning rate"
    if any(not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0) for x in lrs):
        return "every learning rate must be a finite number > 0"
    if len(set(lrs)) != len(lrs):
        return "must not repeat a learning rate"
    return None


def _horizons_problem(hs: list[int]) -> Optional[str]:
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hs):
        return "every horizon must be an integer >= 1"
    if len(set(hs)) != len(hs):
        return "must not repeat a horizon"
    return None


@dataclass
class TaskSpec:
    """One task of the benchmark: a name (cell ids, the summary) and the training overrides that make it."""

    name: str = param("bifurcation", help="task name in cell ids and the summary (env/experiment + variant), e.g. bifurcation-h8",
                      check=lambda v: None if v and all(c.isalnum() or c in "-_." for c in v) else "letters, digits, - _ . only",
                      rule="letters, digits, - _ . only")
    overrides: list[str] = param(default_factory=list, help="training overrides selecting the task, e.g. [env=bifurcation, env.horizon=8]")


@dataclass
class BenchmarkConfig:
    """A credit-assignment benchmark (survey §9): the same budget and lr sweep for every method."""

    name: str = param("benchmark", help="name shown in MLflow and the Prefect UI")
    methods: list[str] = param(default_factory=lambda: ["grpo", "oracle"], help="credit methods compared (registry names; grpo = the baseline, oracle = the upper bound)", check=_methods_problem, rule="registered credit methods, each once")
    tasks: list[TaskSpec] = field(default_factory=lambda: [TaskSpec()], metadata={"help": "tasks: name + training overrides"})
    horizons: list[int] = param(default_factory=list, help="CA efficiency frontier: every task is run at each horizon H (task NAME-hH, env.horizon=H after its overrides); empty = the tasks as given", check=_horizons_problem, rule="distinct integers >= 1")
    seeds: int = param(3, help="seeds per (method, task, lr): 0 .. seeds-1 (survey §9.2: >= 3 for confidence intervals)", ge=1)
    lrs: list[float] = param(default_factory=lambda: [3e-4, 1e-3, 3e-3], help="learning-rate sweep every method gets (update.lr); the best per method is reported", check=_lrs_problem, rule="distinct finite numbers > 0")
    max_iterations: int = param(20, help="safety cap on iterations per cell (a budget normally stops it first)", ge=1)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    overrides: list[str] = param(default_factory=list, help="training overrides of every cell, e.g. [rollout.group_size=4]")
    method_overrides: dict[str, list[str]] = param(default_factory=dict, help="training overrides per method, e.g. {gae: [update=ppo]} (entries of methods not benchmarked are unused)")
    cell_overrides: dict[str, list[str]] = param(default_factory=dict, help="training overrides per cell: glob on the cell id (METHOD-TASK-sSEED-lrLR) -> overrides")
    target_success: float = param(0.8, help="success rate whose compute-to-reach the table reports", ge=0, le=1)
    compute_measure: str = param("forward_tokens", help="compute on the curves' x axis and in compute-to-target", choices=COMPUTE_MEASURES)
    select_by: str = param("eval_success", help="final success that picks the best lr and fills the table: the eval split after training, or the last training batch", choices=("eval_success", "success"))
    parallel: int = param(2, help="cells trained at once on the local task runner (threads of this process)", ge=1)
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    def config_rules(self):
        """Rules between fields (checked by stages.config_fields.check)."""
        names = [t.name for t, _ in expanded_tasks(self)]
        if not names:
            yield "tasks", "must hold at least one task"
        elif len(set(names)) != len(names):
            yield "tasks", "task names must be distinct"


@dataclass(frozen=True)
class Cell:
    """One training run of the benchmark."""

    method: str
    task: str
    seed: int
    lr: float
    overrides: tuple[str, ...]
    #: the task's horizon when the benchmark sweeps ``horizons`` (the frontier), else None
    horizon: Optional[int] = None
    #: the configured task it came from (``tasks[].name``; the task itself when there is no sweep)
    family: str = ""

    @property
    def cell_id(self) -> str:
        return cell_id(self.method, self.task, self.seed, self.lr)


def cell_id(method: str, task: str, seed: int, lr: float) -> str:
    return f"{method}-{task}-s{seed}-lr{lr:g}"


def expanded_tasks(cfg: BenchmarkConfig) -> list[tuple[TaskSpec, Optional[int]]]:
    """The tasks the cells run: the configured ones, or with ``horizons`` each one at every H
    (``NAME-hH`` with ``env.horizon=H`` appended to its overrides), tasks outermost; with the
    horizon (None without a sweep). The frontier (:func:`stages.benchmark.learning.frontier_table`)
    groups results by (configured task, H)."""
    if not cfg.horizons:
        return [(t, None) for t in cfg.tasks]
    return [(TaskSpec(name=f"{t.name}-h{h}", overrides=list(t.overrides) + [f"env.horizon={h}"]), h)
            for t in cfg.tasks for h in cfg.horizons]


def benchmark_options() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "benchmark").glob("*.yaml"))


def _source(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise problem_error("benchmark", name_or_path, "no such file")
        return path
    named = configs_dir() / "benchmark" / f"{name_or_path}.yaml"
    if not named.is_file():
        raise problem_error("benchmark", name_or_path,
                            f"unknown benchmark config; available: {', '.join(benchmark_options()) or '(none)'} (or a YAML path)")
    return named


def load_benchmark_config(name_or_path: Optional[str] = None, overrides: Optional[list[str]] = None,
                          base: Optional[DictConfig] = None) -> DictConfig:
    """Resolve a benchmark config (a name under configs/benchmark/, a YAML path, or ``base``: a
    saved one) with dotlist ``overrides``; check every field and every cell; ConfigError on the first problem."""
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{bad[0]}: an override must look like key=value (e.g. seeds=2, budget.env_steps=500)")
    schema = OmegaConf.structured(BenchmarkConfig)
    layer = base if base is not None else _load_yaml(_source(name_or_path or "bifurcation_small"))
    try:
        cfg = OmegaConf.merge(schema, layer)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as exc:
        raise _friendly(exc, schema, overrides) from None
    OmegaConf.set_struct(cfg, True)
    obj = OmegaConf.to_object(cfg)
    problems = check(obj)
    for i, task in enumerate(obj.tasks):
        problems += check(task, f"tasks[{i}]")
    if problems:
        raise ConfigError(problems[0].line())
    check_cells(obj)
    return cfg


def cells(cfg: BenchmarkConfig) -> list[Cell]:
    """Every cell, tasks (each at every horizon of a sweep) outermost, then methods, lrs, seeds (the order they are submitted in)."""
    out = []
    budget = [f"budget.{k}={getattr(cfg.budget, k)}" for k in BUDGET_KEYS if getattr(cfg.budget, k) is not None]
    families = [t.name for t in cfg.tasks for _ in (cfg.horizons or [None])]
    for family, (task, horizon) in zip(families, expanded_tasks(cfg)):
        for method in cfg.methods:
            for lr in cfg.lrs:
                for seed in range(cfg.seeds):
                    cid = cell_id(method, task.name, seed, lr)
                    extra = [o for pat, ovs in cfg.cell_overrides.items() if fnmatch.fnmatchcase(cid, pat) for o in ovs]
                    ovs = (list(cfg.overrides) + list(task.overrides) + [f"credit={method}"]
                           + list(cfg.method_overrides.get(method, [])) + extra
                           + [f"seed={seed}", f"update.lr={lr!r}", f"iterations={cfg.max_iterations}"] + budget)
                    out.append(Cell(method=method, task=task.name, seed=seed, lr=float(lr), overrides=tuple(ovs),
                                    horizon=horizon, family=family))
    return out


def check_cells(cfg: BenchmarkConfig) -> None:
    """Load every (task, method) as a training config (one seed and lr: they change no rule); the
    first that fails is one line naming the task, the method and the training rule it breaks."""
    seen: set[tuple[str, str]] = set()
    index = {t.name: i for i, t in enumerate(cfg.tasks)}
    for cell in cells(cfg):
        if (cell.task, cell.method) in seen:
            continue
        seen.add((cell.task, cell.method))
        try:
            load_config(list(cell.overrides))
        except ConfigError as exc:
            raise problem_error(f"tasks[{index[cell.family]}]", cell.task,
                                f"method {cell.method} cannot run on it: {exc}") from None


def to_object(cfg: DictConfig) -> BenchmarkConfig:
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def describe(cfg: Any) -> str:
    obj = cfg if isinstance(cfg, BenchmarkConfig) else to_object(cfg)
    n_tasks = len(expanded_tasks(obj))
    n = len(obj.methods) * n_tasks * len(obj.lrs) * obj.seeds
    limits = ", ".join(f"{k}={v:g}" for k, v in obj.budget.limits().items()) or "none"
    tasks = f"{n_tasks} tasks" + (f" ({len(obj.tasks)} x horizons {obj.horizons})" if obj.horizons else "")
    return (f"{len(obj.methods)} methods x {tasks} x {len(obj.lrs)} lrs x {obj.seeds} seeds = {n} cells; "
            f"budget {limits}; max_iterations={obj.max_iterations}")
