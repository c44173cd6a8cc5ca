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

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.base import EnvConfig
from environments.registry import get_family_class
from environments.sandbox.base import SandboxConfig
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditConfig
from stages.credit.registry import get_method_class
from stages.rollout.config import ModelConfig, RolloutConfig
from stages.update.config import UpdateConfig
from stages.update.loss_registry import get_loss, loss_names
from flows.runner_config import RunnerConfig
from stages.benchmark.budget import BudgetConfig
from stages.config_fields import Problem, check, format_value, param

#: config groups under configs/
GROUPS = ("model", "env", "credit", "update", "experiment")
#: stages a fault can be injected into (debug.crash_at)
STAGES = ("env", "rollout", "reward", "credit", "update", "checkpoint", "eval", "prepare")
#: config sections whose values change what training computes (they enter the config hash)
HASHED_SECTIONS = ("seed", "model", "env", "sandbox", "rollout", "credit", "update")


class ConfigError(ValueError):
    """A bad configuration, reported before any compute starts. Its text is ``<key>=<value>: <rule>``
    (the CLI prints ``creditflow: config error: <text>``)."""


def problem_error(key: str, value: Any, rule: str) -> ConfigError:
    """The :class:`ConfigError` of one broken rule, in the one-line ``<key>=<value>: <rule>`` shape."""
    return ConfigError(Problem(key, value, rule).line())


def _crash_at_problem(spec: str) -> Optional[str]:
    try:
        parse_crash_at(spec)
    except ConfigError as exc:
        return str(exc).split(": ", 1)[1]
    return None


@dataclass
class TrackingConfig:
    """Keys allowed under ``tracking.``."""

    mlflow_uri: Optional[str] = param(None, help="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///$CREDITFLOW_HOME/mlflow.db")
    experiment: str = param("creditflow", help="MLflow experiment name")
    heatmap_every: int = param(5, help="log a credit heatmap PNG every N iterations (and at the last one); 0 = never", ge=0)
    retry_seconds: float = param(300.0, help="how long an unreachable tracking store is retried (metrics buffered in runs/<id>/tracking_buffer.jsonl) before the run fails", ge=0)
    parent_run_id: Optional[str] = param(None, help="MLflow run this run is nested under (set by `creditflow benchmark` for its cells)")
    background_sender: bool = param(True, help="send the MLflow journal from one background thread, off the flow's critical path (false: the flow sends each entry itself)")


@dataclass
class ReportConfig:
    """Keys allowed under ``report.``: reporting-checklist fields that cannot be measured (Appendix C)."""

    baseline_run: Optional[str] = param(None, help="run id of the episode-level baseline run this run is compared with")
    ablation_of: Optional[str] = param(None, help="run id of the full method this run ablates (CA-component ablation)")
    notes: str = param("", help="free text recorded with the run")


@dataclass
class DebugConfig:
    """Keys allowed under ``debug.`` (never part of the config hash)."""

    crash_at: Optional[str] = param(None, help="inject a fault: \"ITER:STAGE\" raises, \"ITER:STAGE:kill\" SIGKILLs the process", check=_crash_at_problem, rule="must look like ITER:STAGE or ITER:STAGE:kill with STAGE one of " + ", ".join(STAGES))


@dataclass
class TrainConfig:
    """The whole run. Every field has a default; ``creditflow config show`` prints the resolved tree."""

    seed: int = param(0, help="master seed; every stage derives its own generator from (seed, iteration, stage)")
    iterations: int = param(10, help="training iterations (each runs the five stages); with a budget, the cap", ge=1)
    eval_episodes: int = param(64, help="eval-split episodes for the success rate before/after training", ge=1)
    eval_every: int = param(0, help="also evaluate every N iterations (0 = only before and after)", ge=0)
    eval_temperature: float = param(1.0, help="sampling temperature at evaluation", ge=0)
    run_name: Optional[str] = param(None, help="human-readable name shown in MLflow")
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
    budget: BudgetConfig = field(default_factory=BudgetConfig)  # compute budgets: stop when one is spent (stages/benchmark/budget.py)


def configs_dir() -> Path:
    """The ``configs/`` directory (``CREDITFLOW_CONFIGS`` overrides)."""
    env = os.environ.get("CREDITFLOW_CONFIGS")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "configs"
    if not path.is_dir():
        raise problem_error("CREDITFLOW_CONFIGS", str(path), "configs directory not found (set CREDITFLOW_CONFIGS)")
    return path


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (configs_dir() / group).glob("*.yaml"))


def _load_yaml(path: Path) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors
        raise problem_error(str(path), "", "cannot parse: " + " ".join(str(exc).split())) from None
    if not isinstance(node, DictConfig):
        raise problem_error(str(path), "", "must hold a mapping")
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
    raise problem_error(group, option, f"unknown {group} option; available: {', '.join(group_options(group)) or '(none)'}")


def _check_registered(group: str, name: str) -> type:
    from environments.registry import family_names
    from stages.credit.registry import method_names

    try:
        return get_method_class(name) if group == "credit" else get_family_class(name)
    except KeyError:
        known = method_names() if group == "credit" else family_names()
        what = "credit method" if group == "credit" else "task family"
        raise problem_error(group, name, f"unknown {what}; known: {', '.join(known)}") from None


def _split_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    groups: dict[str, str] = {}
    dotlist: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key=value (e.g. credit=gae, update.lr=1e-5)")
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


def _dotlist_value(dotlist: list[str], key: str) -> Optional[str]:
    for item in reversed(dotlist):
        k, _, v = item.partition("=")
        if k.strip() == key:
            return v
    return None


def _friendly(exc: OmegaConfBaseException, schema: DictConfig, dotlist: list[str]) -> ConfigError:
    """An OmegaConf merge error as ``<key>=<value>: <rule>``."""
    key = str(getattr(exc, "full_key", None) or "")
    msg = str(exc).split("\n")[0]
    value = _dotlist_value(dotlist, key)
    if value is None:
        value = getattr(exc, "value", None)
    if isinstance(exc, ConfigKeyError) or "not in" in msg:
        parent, _, leaf = key.rpartition(".")
        try:
            node = OmegaConf.select(schema, parent) if parent else schema
            allowed = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else ""
        except Exception:
            allowed = ""
        where = f" under '{parent}'" if parent else " at top level"
        return problem_error(key, value, "unknown key" + (f"; allowed{where}: {allowed}" if allowed else ""))
    if isinstance(exc, ValidationError):
        try:
            expected = OmegaConf.get_type(OmegaConf.select(schema, key.rpartition(".")[0]) or schema, key.rpartition(".")[2])
        except Exception:
            expected = None
        name = getattr(expected, "__name__", None)
        article = "an" if name and name[0] in "aeiou" else "a"
        return problem_error(key, value, f"wrong type: must be {article} {name}" if name else f"wrong type: {msg}")
    return problem_error(key, value, msg)


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
        exp_defaults: dict[str, Any] = {}
        if "experiment" in group_choices:
            exp = _group_node("experiment", group_choices["experiment"])
            exp_defaults = dict(exp.pop("defaults", {}) or {})
            defaults.update(exp_defaults)
            exp_body: Optional[DictConfig] = exp
        else:
            exp_body = None
        choices = {g: defaults.get(g) for g in GROUPS if g != "experiment"}
        choices.update({g: v for g, v in group_choices.items() if g != "experiment"})
        if "update" not in group_choices and "update" not in exp_defaults and choices.get("credit"):
            # a method may name the update group it composes with (CreditMethod.default_update)
            own = getattr(_check_registered("credit", choices["credit"]), "default_update", "")
            if own:
                choices["update"] = own
        layers: list[Any] = [base_node]
        for g in ("model", "env", "credit", "update"):
            if choices.get(g):
                layers.append({g: _group_node(g, choices[g])})
        if exp_body is not None:
            layers.append(exp_body)
    else:
        if group_choices:
            g = sorted(group_choices)[0]
            raise problem_error(g, group_choices[g], "config groups cannot be changed for an existing run; "
                                "start a new run instead")
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
        raise _friendly(exc, schema, dotlist) from None
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def check_rules(cfg: DictConfig) -> list[Problem]:
    """Every broken field rule of the resolved config: core, model, env (the selected family's
    Config), sandbox, rollout, credit (the selected method's Config), update, tracking, runner
    (:func:`stages.config_fields.check`, with the outside-world hooks)."""
    obj = to_object(cfg)
    return check(obj, "", world=True)


def check_learnable(cfg: DictConfig) -> Optional[ConfigError]:
    """A combination that cannot learn by construction, with the reason, from what the method declares."""
    method = get_method_class(cfg.credit.method)
    upd = cfg["update"]
    if method.needs_group and cfg.rollout.group_size < 2:
        return problem_error(
            "rollout.group_size", cfg.rollout.group_size,
            f"must be >= 2 for credit.method={method.name}: its baseline is the group of rollouts of a task, so a "
            "group of one gives every advantage 0 and nothing is learned")
    if method.needs_exact_mdp and not get_family_class(cfg.env.name).exact_mdp:
        return problem_error(
            "credit.method", method.name,
            f"needs a task whose exact MDP is known (a family with exact_mdp, e.g. env=bifurcation); "
            f"env={cfg.env.name} has none, so there is no exact advantage to assign")
    if "planning_pattern" in method.needs and not get_family_class(cfg.env.name).planning_pattern:
        return problem_error(
            "credit.method", method.name,
            f"needs planning text and env.name={cfg.env.name} declares none (TaskFamily.planning_pattern): every "
            "token would be execution and the method would be GRPO exactly; use credit.method=grpo")
    if cfg.credit.get("counterfactual") == "default" and get_family_class(cfg.env.name).default_action is None:
        return problem_error(
            "credit.counterfactual", "default",
            f"needs the family's default action and env.name={cfg.env.name} declares none "
            "(TaskFamily.default_action); use credit.counterfactual=resample")
    if cfg.credit.get("expert") == "optimal" and not get_family_class(cfg.env.name).exact_mdp:
        return problem_error(
            "credit.expert", "optimal",
            f"needs the family's scripted optimal agent (an exact MDP: TaskFamily.exact_mdp) and env.name={cfg.env.name} "
            "has none, so there is no expert to compare the agent's steps with; use credit.expert=successes")
    if method.needs_privileged and not set(method.needs_privileged) & set(get_family_class(cfg.env.name).privileged_keys):
        return problem_error(
            "credit.method", method.name,
            f"needs privileged training-time information ({' or '.join(method.needs_privileged)} in Trajectory.privileged) "
            f"and env.name={cfg.env.name} declares none (TaskFamily.privileged_keys); use a family that has it "
            "(e.g. env=tooluse, experiment=math)")
    if method.needs_plan_turn and not cfg.env.get("plan_first", False):
        return problem_error(
            "credit.method", method.name,
            f"needs a plan turn at the start of every episode and env.name={cfg.env.name} has none (env.plan_first "
            "is not set; the plan-first variant exists for env=bifurcation): there is no plan to credit")
    family = get_family_class(cfg.env.name)
    replays = {"mc_rollouts", "greedy_rollout"} & set(method.needs)
    if family.external_agent and replays:
        return problem_error(
            "credit.method", method.name,
            f"needs {' and '.join(sorted(replays))} (re-running episodes from inside) and env.name={cfg.env.name}'s "
            "episodes are played by an outside agent program, which can be neither replayed nor forked; use a method "
            "without them (e.g. credit=lightning or grpo)")
    if family.external_agent and cfg.runner.rollout_shards > 1:
        return problem_error(
            "runner.rollout_shards", cfg.runner.rollout_shards,
            f"must be 1 for env.name={cfg.env.name}: its episodes are played by one agent program against the "
            "endpoint this process serves")
    if "critic" in method.needs and not upd.value_coef > 0:
        return problem_error(
            "update.value_coef", upd.value_coef,
            f"must be > 0 for credit.method={method.name}: it needs a critic and update.value_coef=0 trains no value "
            "loss, so the critic never learns")
    loss = get_loss(upd.loss)
    stale = check_async(cfg, method, loss)
    if stale is not None:
        return stale
    if loss.accepts is not None and method.granularity not in loss.accepts:
        return problem_error(
            "update.loss", upd.loss,
            f"{loss.reads} (credit of granularity {'/'.join(sorted(loss.accepts))}); "
            f"credit.method={method.name} gives {method.granularity}-level credit, which it would average away")
    if loss.needs_pairs and cfg.rollout.group_size < 2:
        return problem_error(
            "rollout.group_size", cfg.rollout.group_size,
            f"must be >= 2 for update.loss={upd.loss}: its preference pairs are drawn inside a group of rollouts of "
            "one task, so a group of one has no pair and nothing is learned")
    if loss.needs_pairs and upd.minibatch_size % cfg.rollout.group_size:
        return problem_error(
            "update.minibatch_size", upd.minibatch_size,
            f"must be a multiple of rollout.group_size={cfg.rollout.group_size} for update.loss={upd.loss}: a "
            "mini-batch holds whole groups so that no preference pair is split between two")
    return None




#: credit needs that play the environment with the learner's policy inside the credit stage, and why
#: each cannot take stale rollouts. They all put environment rollouts back on the learner's path
#: (beside the rollout lane's environments), the work asynchronous rollouts exist to take off it.
#: Everything else (group baselines, critics, reference/scorer log-probs of the batch's tokens,
#: judges, helpers) is a function of the batch that the loss's off-policy correction covers.
ON_POLICY_NEEDS: dict[str, str] = {
    "mc_rollouts": "Monte Carlo continuations of the learner's policy from states a stale policy reached: one value "
                   "estimate mixing two policies, which no importance ratio of the loss corrects",
    "greedy_rollout": "a greedy episode of the learner's policy per task, played in the credit stage",
}


def check_async(cfg: DictConfig, method: Any, loss: Any) -> Optional[ConfigError]:
    """``rollout.max_staleness >= 1`` (bounded-staleness asynchronous rollouts, flows/train.py): the
    one place that says which combinations may learn from stale rollouts. Refused, in one line: a
    loss that declares no off-policy correction (``LossSpec.off_policy``), a credit method whose
    needs replay the environment with the learner's policy (:data:`ON_POLICY_NEEDS`, and MC process
    rewards), families played by an outside agent program, and the engines/runners the
    asynchronous loop does not drive (vLLM, rollout shards, Dask/Ray)."""
    n = cfg.rollout.max_staleness
    if not n:
        return None
    if not loss.off_policy:
        ok = ", ".join(name for name in loss_names() if get_loss(name).off_policy)
        return problem_error(
            "update.loss", cfg["update"].loss,
            f"declares no off-policy correction (LossSpec.off_policy) and rollout.max_staleness={n} trains on "
            f"rollouts of a policy up to that many updates old; use a loss that declares one ({ok}) or "
            "rollout.max_staleness=0")
    on_policy = [(need, ON_POLICY_NEEDS[need]) for need in ON_POLICY_NEEDS if need in method.needs]
    if "process_rewards" in method.needs and cfg.credit.get("process_reward") == "mc":
        on_policy.append(("process_rewards (credit.process_reward=mc)", ON_POLICY_NEEDS["mc_rollouts"]))
    if on_policy:
        need, why = on_policy[0]
        return problem_error(
            "rollout.max_staleness", n,
            f"credit.method={method.name} needs {need}: {why}, and environment rollouts back on the learner's path; "
            "use rollout.max_staleness=0")
    if get_family_class(cfg.env.name).external_agent:
        return problem_error(
            "rollout.max_staleness", n,
            f"env.name={cfg.env.name}'s episodes are played by one outside agent program against the endpoint this "
            "process serves, which the rollout lane cannot share with the learner's evaluations; use rollout.max_staleness=0")
    if cfg.rollout.engine != "hf" or cfg.runner.kind != "local" or cfg.runner.rollout_shards != 1:
        return problem_error(
            "rollout.max_staleness", n,
            "asynchronous rollouts are implemented for rollout.engine=hf with runner.kind=local and "
            f"runner.rollout_shards=1 (got engine={cfg.rollout.engine}, runner.kind={cfg.runner.kind}, "
            f"rollout_shards={cfg.runner.rollout_shards}); use rollout.max_staleness=0")
    return None


def _validate_vllm(cfg: DictConfig) -> None:
    """rollout.engine=vllm: fail before any compute when the engine cannot run here."""
    from stages.rollout.vllm_engine import CPU_HEAD_SIZES, INSTALL_HINT, vllm_available

    r = cfg.rollout
    if r.vllm_url is None and not vllm_available():
        raise problem_error("rollout.engine", "vllm", f"the vllm package is not installed: {INSTALL_HINT}")
    if r.vllm_url is None and cfg.model.path is None and cfg.model.device != "cuda":
        import torch

        if not (cfg.model.device == "auto" and torch.cuda.is_available()):
            head_dim = cfg.model.hidden_size // max(cfg.model.num_heads, 1)
            if head_dim not in CPU_HEAD_SIZES:
                raise problem_error(
                    "model.num_heads", cfg.model.num_heads,
                    f"rollout.engine=vllm on CPU: vLLM's CPU attention supports head sizes {list(CPU_HEAD_SIZES)}, the "
                    f"tiny model has head_dim = model.hidden_size / model.num_heads = {head_dim}; set e.g. "
                    f"model.num_heads={max(1, cfg.model.hidden_size // 32)} model.num_kv_heads=1")


def validate(cfg: DictConfig) -> None:
    """Check the whole resolved config before anything is created; raise the first problem as a
    one-line :class:`ConfigError`. Field rules and rules between fields are declared at the fields
    (:mod:`stages.config_fields`); only combinations that cannot learn and rules that look at the
    outside world (a model directory, Docker, the vllm package) are checked here."""
    problems = check_rules(cfg)
    if problems:
        raise ConfigError(problems[0].line())
    err = check_learnable(cfg)
    if err is not None:
        raise err
    bad_sandbox = get_family_class(cfg.env.name).sandbox_problem(cfg.env, cfg.sandbox)
    if bad_sandbox is not None:
        key, rule = bad_sandbox
        raise problem_error(key, OmegaConf.select(cfg, key), rule)
    if cfg.rollout.engine == "vllm":
        _validate_vllm(cfg)
    if cfg.sandbox.backend == "docker":
        # Docker asked for explicitly: the engine must be reachable before any compute starts
        from environments.sandbox import SandboxUnavailable, check_docker

        try:
            check_docker(OmegaConf.to_object(cfg.sandbox))
        except SandboxUnavailable as exc:
            raise problem_error("sandbox.backend", "docker", str(exc)) from None
    if cfg.model.path is not None:
        path = Path(os.path.expanduser(cfg.model.path))
        if not path.is_dir():
            raise problem_error("model.path", cfg.model.path, f"model directory {path} does not exist")
        if not (path / "config.json").is_file():
            raise problem_error("model.path", cfg.model.path, f"{path} has no config.json (not a Hugging Face model directory)")


def parse_crash_at(spec: str) -> tuple[int, str, str]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or parts[1] not in STAGES or (
        len(parts) == 3 and parts[2] not in ("raise", "kill")
    ):
        raise problem_error("debug.crash_at", spec, "must look like ITER:STAGE or ITER:STAGE:kill with STAGE one of "
                            + ", ".join(STAGES))
    return int(parts[0]), parts[1], parts[2] if len(parts) == 3 else "raise"


def to_object(cfg: DictConfig) -> TrainConfig:
    """The resolved config as typed dataclasses (credit/env nodes as the selected classes)."""
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


#: keys added to a hashed section after runs existed, with the value that reproduces what those runs
#: computed: at that value the key stays out of the hash, so a run created before it resumes (its
#: saved config lacks the key) and keeps its cache keys; any other value enters the hash
HASH_NEUTRAL: dict[tuple[str, str], Any] = {("rollout", "max_staleness"): 0}


def config_hash(cfg: DictConfig) -> str:
    """Hash of the sections that change what training computes (not iterations, tracking, debug)."""
    data = {k: OmegaConf.to_container(cfg[k], resolve=True) if isinstance(cfg[k], DictConfig) else cfg[k]
            for k in HASHED_SECTIONS}
    for (section, key), neutral in HASH_NEUTRAL.items():
        if isinstance(data.get(section), dict) and data[section].get(key, neutral) == neutral:
            data[section].pop(key, None)
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


def describe_config(group: Optional[str] = None, overrides: Optional[list[str]] = None) -> str:
    """``creditflow config describe [group]``: key, type, default, rule and help of every field, from
    the fields' metadata (:mod:`stages.config_fields`). ``env``/``credit`` show the family's/method's
    own Config (``env=NAME`` / ``credit=NAME`` in ``overrides`` select it; default: base.yaml's)."""
    from stages.config_fields import describe, render

    groups, _ = _split_overrides(list(overrides or []))
    defaults = dict(_load_yaml(configs_dir() / "base.yaml").get("defaults", {}) or {})
    method = _check_registered("credit", groups.get("credit") or defaults.get("credit") or CreditConfig.method)
    family = _check_registered("env", groups.get("env") or defaults.get("env") or EnvConfig.name)
    docs = describe(TrainConfig)
    docs = [d for d in docs if d.key.split(".")[0] not in ("env", "credit")]
    docs += describe(family.Config, "env") + describe(method.Config, "credit")
    if group:
        known = sorted({d.key.split(".")[0] for d in docs if "." in d.key} | {"core"})
        if group not in known:
            raise problem_error("group", group, f"unknown config group; one of {', '.join(known)}")
        docs = [d for d in docs if (d.key.split(".")[0] == group if group != "core" else "." not in d.key)]
    return render(docs)
