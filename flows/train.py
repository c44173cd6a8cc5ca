"""The training flow: the five stages of survey §8 as tracked, resumable Prefect tasks.

Reads like the pipeline diagram::

    prepare ─▶ eval(before) ─▶ for each iteration:
        env construction ─▶ rollout ─▶ reward ─▶ credit assignment ─▶ policy update
    ─▶ eval(after) ─▶ checklist

Every task persists its result under ``runs/<id>/results`` with the cache key
``(run id, iteration, stage, config hash)``. A resumed run re-enters the same keys, so stages
that finished load from storage and only the interrupted stage and its successors execute
(``executions.jsonl`` records every stage body that actually ran). Metrics of an iteration go to
MLflow in one batch after its update, exactly once per step (see :mod:`flows.tracking`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.context import get_run_context  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402

from environments.construct import EnvBatch, build_env_batch  # noqa: E402
from flows import checklist as checklist_mod  # noqa: E402
from flows.config import flatten, to_yaml  # noqa: E402
from flows import secrets  # noqa: E402
from flows.progress import PRELUDE, RunProgress, for_console  # noqa: E402
from flows.providers import build_context, run_slots  # noqa: E402
from flows.runtime import RunState  # noqa: E402
from flows.scaleout import rollout_sharded, with_runner  # noqa: E402
from flows.tracking import Tracker, TrackingUnavailableError, default_tracking_uri  # noqa: E402
from stages.credit.stats import credit_statistics  # noqa: E402
from stages.reward.verifier import compute_rewards  # noqa: E402
from stages.schema import Batch, CreditResult, Overhead  # noqa: E402
from stages.update.checkpoint import CheckpointError  # noqa: E402

STAGES = ("env", "rollout", "reward", "credit", "update")

# live run states of this process, by run id (tasks look them up; Prefect never pickles them)
_RUNS: dict[str, RunState] = {}

#: fault-injection hooks for in-process tests: ``hook(state, iteration)`` is called at the end of
#: every iteration, after its metrics went to MLflow (e.g. stop the tracking server, fill the disk)
ITERATION_HOOKS: list[Callable[[RunState, int], None]] = []


@dataclass
class StageResult:
    """What a stage task returns and Prefect persists."""

    value: Any
    stats: dict[str, float] = field(default_factory=dict)
    overhead: Overhead = field(default_factory=Overhead)
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0


class ResultNotPersistedError(RuntimeError):
    """A stage finished but its result could not be persisted (disk full): the run stops there."""


def _result_is_whole(path: Path, check_content: bool) -> bool:
    """The persisted result record exists and (for a freshly written one) is complete JSON."""
    if not path.is_file():
        return False
    if check_content:
        try:
            json.loads(path.read_bytes())
        except ValueError:
            return False
    return True


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return f"{parameters['run_id']}-{parameters['stage_key']}-{parameters['chash']}"


def _stage(name: str) -> Callable:
    """Wrap a stage body ``fn(state, iteration, *args)`` as a persisted, cache-keyed Prefect task."""

    def deco(fn: Callable) -> Any:
        def body(run_id: str, stage_key: str, chash: str, iteration: int, *args: Any) -> StageResult:
            state = _RUNS[run_id]
            state.record_execution(iteration, name)
            state.maybe_crash(iteration, name)
            t0, c0 = time.perf_counter(), _cpu_seconds()
            out: StageResult = fn(state, iteration, *args)
            out.wall_seconds = time.perf_counter() - t0
            out.cpu_seconds = _cpu_seconds() - c0
            return out

        body.__name__ = f"{name}_stage"
        body.__qualname__ = body.__name__
        body.__doc__ = fn.__doc__
        return task(name=name, persist_result=True, cache_key_fn=_cache_key, retries=0)(body)

    return deco


# ---------------------------------------------------------------------------- the five stages
@_stage("prepare")
def prepare_stage(state: RunState, iteration: int) -> StageResult:
    """Build (or load from cache) the base policy, warm it up, write the init checkpoint."""
    info = state.build_policy()
    path = state.save_init_checkpoint()
    return StageResult(value={"checkpoint": path, "model": info})


@_stage("env")
def env_stage(state: RunState, iteration: int, curriculum: Optional[dict[str, float]] = None) -> StageResult:
    """Stage 1: environment construction (task instances x group size, episode seeds), sampled by
    the credit method's schedule over ``curriculum`` (the scores the credit stages of the earlier
    iterations recorded, read from their persisted results: :func:`next_curriculum`)."""
    cfg = state.obj
    curriculum = dict(curriculum or {})
    pool = getattr(cfg.env, "train_size", cfg.rollout.tasks_per_iteration)
    weights = state.method.task_weights(curriculum, iteration, cfg.iterations)
    envb = build_env_batch(state.family, cfg.rollout.tasks_per_iteration, cfg.rollout.group_size, pool,
                           iteration, cfg.seed, split="train", weights=weights)
    envb.curriculum = curriculum
    stats = {"episodes": len(envb.slots), "groups": envb.num_groups}
    if weights is not None:
        stats.update(curriculum_tasks=float(len(curriculum)),
                     curriculum_weight_max=max(weights.values(), default=1.0),
                     curriculum_weight_min=min(weights.values(), default=1.0))
    return StageResult(value=envb, stats=stats, overhead=envb.overhead)


def next_curriculum(prev: Optional[dict[str, StageResult]]) -> dict[str, float]:
    """The curriculum iteration k+1 samples by: iteration k's (persisted) environment batch's
    curriculum updated with the scores its credit stage recorded (``CreditResult.curriculum``)."""
    if prev is None:
        return {}
    return {**getattr(prev["env"].value, "curriculum", {}), **getattr(prev["credit"].value, "curriculum", {})}


def _run_episodes(state: RunState, envb: EnvBatch, seed: int, temperature: float) -> tuple[Batch, Overhead, int]:
    """Play the slots of ``envb`` (live environments and sandboxes made and closed around it)."""
    return run_slots(state, envb.slots, envb.family, seed, temperature)


@_stage("rollout")
def rollout_stage(state: RunState, iteration: int, envb: EnvBatch, checkpoint: str) -> StageResult:
    """Stage 2: multi-turn rollouts with the current policy (the engine named by rollout.engine)."""
    state.ensure_policy(checkpoint)  # also brings a vLLM server (rollout.vllm_url) to this checkpoint
    seed, temperature, runner = state.seed_for(iteration, "rollout"), state.obj.rollout.temperature, state.obj.runner
    cached0 = None
    if runner.kind == "local" and runner.rollout_shards == 1:
        # vLLM's prefix-cache hits, when this process's engine plays the episodes (shards use their own)
        cached0 = state.engine.stats.get("cached_prompt_tokens")
        batch, overhead, gen_tokens = _run_episodes(state, envb, seed, temperature)
    else:  # shards of whole groups, one task each on the flow's task runner (flows/scaleout.py)
        batch, overhead, gen_tokens = rollout_sharded(state.run_id, str(state.home), envb, checkpoint, seed,
                                                      temperature, runner.rollout_shards)
    batch.iteration = iteration
    turns = [len(t.turns) for t in batch.trajectories]
    tokens = [len(t.response_ids) for t in batch.trajectories]
    stats = {
        "generated_tokens": float(gen_tokens),
        "turns_mean": sum(turns) / max(len(turns), 1),
        "tokens_mean": sum(tokens) / max(len(tokens), 1),
        "env_resets": float(overhead.env_resets),
        "env_steps": float(overhead.env_steps),
        # environment construction faults (survey §8.2): groups retried, then dropped whole
        "dropped_groups": float(batch.meta.get("dropped_groups", 0)),
        "env_start_failures": float(batch.meta.get("start_failures", 0)),
        "env_start_seconds": float(batch.meta.get("start_seconds", 0.0)),
        "sandboxes_created": float(batch.meta.get("sandboxes_created", 0)),
        "sandbox_seconds": float(sum(t.meta.get("sandbox_seconds", 0.0) for t in batch.trajectories)),
        "sandbox_execs": float(sum(t.meta.get("sandbox_execs", 0.0) for t in batch.trajectories)),
    }
    if cached0 is not None:  # vLLM: prompt tokens served from its prefix cache (group members, earlier turns)
        stats["cached_prompt_tokens"] = float(state.engine.stats["cached_prompt_tokens"] - cached0)
    return StageResult(value=batch, stats=stats, overhead=overhead)


@_stage("reward")
def reward_stage(state: RunState, iteration: int, batch: Batch) -> StageResult:
    """Stage 3: terminal rewards from the family's verifier, per-turn rewards, fault handling."""
    batch, stats, overhead = compute_rewards(batch, state.family)
    return StageResult(value=batch, stats=stats, overhead=overhead)


def run_iteration(run: Callable[..., StageResult], it: int, checkpoint: str,
                  prev: Optional[dict[str, StageResult]] = None) -> dict[str, StageResult]:
    """One iteration of the five stages of survey §8, each through ``run(task, key, iteration, *args)``:
    the flow's runner goes through Prefect (persisted, cache-keyed), :func:`flows.api.run_plain`'s
    calls the stage bodies directly. The single place that says which stage feeds which; ``prev``
    is the previous iteration's results (its curriculum feeds this iteration's env stage)."""
    env = run(env_stage, f"it{it}-env", it, next_curriculum(prev))
    rollout = run(rollout_stage, f"it{it}-rollout", it, env.value, checkpoint)
    reward = run(reward_stage, f"it{it}-reward", it, rollout.value)
    credit = run(credit_stage, f"it{it}-credit", it, reward.value, checkpoint, env.value)
    update = run(update_stage, f"it{it}-update", it, reward.value, credit.value, checkpoint)
    return {"env": env, "rollout": rollout, "reward": reward, "credit": credit, "update": update}


@_stage("credit")
def credit_stage(state: RunState, iteration: int, batch: Batch, checkpoint: str, envb: EnvBatch) -> StageResult:
    """Stage 4: the configured credit-assignment method, given what it declared it needs."""
    ctx, ctx_overhead = build_context(state, envb, batch, iteration, checkpoint, _pad_id(state))
    tensors = batch.to_tensors(pad_token_id=_pad_id(state))
    result: CreditResult = state.method(tensors, batch, ctx)
    result.overhead = result.overhead + ctx_overhead
    stats = credit_statistics(tensors, result)
    return StageResult(value=result, stats=stats, overhead=result.overhead)


@_stage("update")
def update_stage(state: RunState, iteration: int, batch: Batch, credit: CreditResult, checkpoint: str) -> StageResult:
    """Stage 5: policy update (PPO-clip / GRPO loss), atomic checkpoint."""
    from stages.update.checkpoint import prune_checkpoints, save_checkpoint

    state.ensure_policy(checkpoint)
    tensors = batch.to_tensors(pad_token_id=_pad_id(state))
    stats = state.trainer.update(tensors, credit, seed=state.seed_for(iteration, "update"))
    path = save_checkpoint(
        state.paths.checkpoints, f"iter_{iteration:04d}", state.policy, state.trainer.critic,
        state.trainer.optim_state(), meta={"iteration": iteration, "run_id": state.run_id, "stats": stats},
        before_rename=lambda: state.maybe_crash(iteration, "checkpoint"),
    )
    state.policy_version = str(path)
    # engines that keep their own copy of the weights (vLLM) sample from the new policy from now on
    stats["engine_sync_seconds"] = float(state.engine.sync_weights(state.policy))
    prune_checkpoints(state.paths.checkpoints, keep=max(state.obj.update.keep_checkpoints, 2))
    return StageResult(value={"checkpoint": str(path)}, stats=stats)


@_stage("eval")
def eval_stage(state: RunState, iteration: int, checkpoint: str) -> StageResult:
    """Success rate on the eval split (same eval episodes before and after training: paired)."""
    state.ensure_policy(checkpoint)
    cfg = state.obj
    pool = getattr(cfg.env, "eval_size", cfg.eval_episodes)
    envb = build_env_batch(state.family, cfg.eval_episodes, 1, pool, iteration=10**6, seed=cfg.seed, split="eval")
    batch, overhead, _ = _run_episodes(state, envb, seed=state.seed_for(10**6, "eval"),
                                       temperature=cfg.eval_temperature)
    batch, stats, _ = compute_rewards(batch, state.family)
    n = len(batch)
    lo, hi = checklist_mod.wilson_interval(sum(t.success for t in batch.trajectories), n)
    return StageResult(value={"success_rate": stats["success_rate"], "ci95": (lo, hi), "episodes": n},
                       stats={"success_rate": stats["success_rate"], "ci95_low": lo, "ci95_high": hi},
                       overhead=overhead)


def _pad_id(state: RunState) -> int:
    tok = state.tokenizer
    if tok is None:
        return 0
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


# ---------------------------------------------------------------------------- the flow
def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _tracker(state: RunState) -> Tracker:
    uri = state.cfg.tracking.mlflow_uri or default_tracking_uri(state.home)
    return Tracker(uri, state.cfg.tracking.experiment, state.home, buffer=state.paths.tracking_buffer,
                   retry_seconds=state.cfg.tracking.retry_seconds)


def _prefect_flow_run_id() -> str:
    try:
        return str(get_run_context().flow_run.id)
    except Exception:
        return ""


@flow(name="creditflow-train", flow_run_name="{run_id}", persist_result=False, log_prints=False)
def train_flow(run_id: str, home: Optional[str] = None, progress: bool = True) -> dict[str, Any]:
    """One training run (create it with :func:`flows.api.create_run`, or resume an existing one)."""
    state = RunState.open(run_id, Path(home) if home else None) if run_id not in _RUNS else _RUNS[run_id]
    _RUNS[run_id] = state
    say = for_console(progress)
    try:
        with state.locked():
            return _drive(state, say)
    finally:
        say.close()
        state.close()
        _RUNS.pop(run_id, None)


def flow_for(cfg: Any) -> Any:
    """:func:`train_flow` on the task runner ``cfg.runner`` names (Dask/Ray; unchanged for local)."""
    return with_runner(train_flow, cfg.runner)


def _drive(state: RunState, say: RunProgress) -> dict[str, Any]:
    cfg = state.obj
    secrets.install_log_filter(state.cfg)  # also registers the names of its *_env keys
    logger = get_run_logger()
    storage = state.paths.results
    storage.mkdir(parents=True, exist_ok=True)

    def run(stage_task: Any, stage_key: str, iteration: int, *args: Any, refresh: bool = False
            ) -> tuple[StageResult, bool]:
        """Run (or load from the persisted cache) one stage; also say whether it was cached.
        ``refresh`` re-runs it and overwrites its persisted result (checkpoint recovery)."""
        before = getattr(state, "executed_count", 0)
        result = stage_task.with_options(result_storage=storage, refresh_cache=refresh)(
            state.run_id, stage_key, state.chash, iteration, *[quote(a) for a in args])
        cached = getattr(state, "executed_count", 0) == before
        persisted = storage / _cache_key(None, {"run_id": state.run_id, "stage_key": stage_key, "chash": state.chash})
        if not _result_is_whole(persisted, check_content=not cached):
            # Prefect logs a failed result write and carries on; a run whose stages are not persisted
            # could not be resumed without recomputing them, so stop here, saying why (a half-written
            # record is removed; Prefect would treat it as a cache miss anyway)
            persisted.unlink(missing_ok=True)
            free = shutil.disk_usage(storage).free
            raise ResultNotPersistedError(
                f"the result of stage {stage_key!r} of run {state.run_id} could not be written to {persisted} "
                f"({free} bytes free on that filesystem; see the error logged above, e.g. no space left on "
                f"device); nothing after it ran. Free space, then `creditflow resume {state.run_id}`")
        return result, cached

    tracker = _tracker(state)
    flow_run_id = _prefect_flow_run_id()
    if state.info.get("mlflow_run_id"):
        tracker.attach(state.info["mlflow_run_id"])
    else:
        tracker.start(cfg.run_name or state.run_id, tags={
            "creditflow.run_id": state.run_id,
            "creditflow.config_hash": state.chash,
            "mlflow.source.git.commit": _git_commit(),
        })
        state.info["mlflow_run_id"] = tracker.run_id
    state.info.setdefault("prefect_flow_runs", []).append(flow_run_id)
    state.save_info()
    tracker.log_params(flatten(state.cfg))
    tracker.set_tags({"prefect.flow_run_id": flow_run_id,
                      "prefect.flow_run_ids": ",".join(x for x in state.info["prefect_flow_runs"] if x),
                      "creditflow.method": cfg.credit.method, "creditflow.env": cfg.env.name})
    tracker.set_tags(_recommendation_tags(state))
    tracker.set_tags(_sandbox_tags(state))
    tracker.log_text(to_yaml(state.cfg), "config/resolved.yaml")
    try:
        create_markdown_artifact(
            key=f"mlflow-{state.run_id.lower()}"[:60].replace("_", "-"),
            markdown=secrets.mask_text(f"MLflow run `{tracker.run_id}` (experiment `{cfg.tracking.experiment}`, tracking URI "
                     f"`{tracker.uri}`) for creditflow run `{state.run_id}`."),
            description="MLflow run of this training run",
        )
    except Exception as exc:  # the artifact is a convenience link; never fail a run for it
        logger.warning("could not create the Prefect artifact linking the MLflow run: %s", exc)

    try:
        return _iterate(state, say, run, tracker)
    except BaseException as exc:
        # a crash is visible in MLflow (a kill -9 leaves RUNNING; `creditflow resume` continues either way);
        # reporting it must not replace the original error (tracking store down, disk full)
        try:
            tracker.set_tags({"creditflow.failure": f"{type(exc).__name__}: {exc}"[:500]})
            tracker.finish("FAILED")
        except Exception as report_exc:
            print(f"warning: could not record the failure in MLflow: {type(report_exc).__name__}: {report_exc}",
                  file=sys.stderr)
        try:
            state.info["status"] = "failed"
            state.save_info()
        except OSError as report_exc:
            print(f"warning: could not write {state.paths.info}: {report_exc}", file=sys.stderr)
        raise


def _iterate(state: RunState, say: RunProgress, run: Callable, tracker: Tracker) -> dict[str, Any]:
    cfg = state.obj
    acc = checklist_mod.Accumulator()
    say.run_started(state.run_id, cfg.credit.method, cfg.env.name, cfg.model.name, cfg.iterations)

    def timed(stage_task: Any, stage_key: str, iteration: int, *args: Any) -> tuple[StageResult, bool]:
        """``run`` with the progress display told when the stage starts and ends (``*`` = loaded from results)."""
        say.stage_started(iteration, stage_task.name)
        result, cached = run(stage_task, stage_key, iteration, *args)
        say.stage_done(iteration, stage_task.name, result.wall_seconds, cached)
        return result, cached

    def staged(stage_task: Any, stage_key: str, iteration: int, *args: Any) -> StageResult:
        return timed(stage_task, stage_key, iteration, *args)[0]

    prep, cached = timed(prepare_stage, "prepare", PRELUDE)
    acc.add_stage(prep)
    state.model_info = prep.value["model"]
    checkpoint = prep.value["checkpoint"]
    say.prepared(str(state.model_info.get("name")), int(state.model_info.get("num_parameters", 0)), cached)
    ev, cached = timed(eval_stage, "eval-before", PRELUDE, checkpoint)
    acc.add_stage(ev)
    before = ev.value
    say.evaluated("before", before)

    prev: Optional[tuple[StageResult, StageResult, str]] = None  # last iteration's reward, credit, input checkpoint
    last: Optional[dict[str, StageResult]] = None  # last iteration's results (its curriculum)
    for it in range(cfg.iterations):
        say.iteration_started(it)
        try:
            results = run_iteration(staged, it, checkpoint, last)
        except CheckpointError as exc:
            if exc.path is None or Path(exc.path) != Path(checkpoint):
                raise
            checkpoint = _rebuild_checkpoint(state, run, tracker, it, checkpoint, prev, exc)
            say.iteration_started(it)
            results = run_iteration(staged, it, checkpoint, last)
        prev = (results["reward"], results["credit"], checkpoint)
        last = results
        rew, cred, upd = results["reward"], results["credit"], results["update"]
        checkpoint = upd.value["checkpoint"]
        say.iteration_done(it, {"success": rew.stats["success_rate"], "loss": upd.stats.get("loss", float("nan"))})
        for r in results.values():
            acc.add_stage(r)
        acc.add_batch(rew.value, cred.overhead)
        metrics = _iteration_metrics(results)
        if cfg.eval_every and (it + 1) % cfg.eval_every == 0 and it + 1 < cfg.iterations:
            mid, _ = timed(eval_stage, f"eval-it{it}", it, checkpoint)
            acc.add_stage(mid)
            metrics.update({f"eval.{k}": v for k, v in mid.stats.items()})
        if tracker.log_step(it, metrics):
            for key, record in (getattr(cred.value, "records", None) or {}).items():  # e.g. InT's interventions
                tracker.log_json(record, f"credit/{key}/iter_{it:04d}.json")
            heat_every = cfg.tracking.heatmap_every
            if heat_every and ((it + 1) % heat_every == 0 or it + 1 == cfg.iterations):
                _log_heatmap(tracker, rew.value, cred.value, it)
            tracker.set_tags(_checklist_tags(state, checklist_mod.fill(state, acc, tracker, before, None)))
        for hook in ITERATION_HOOKS:
            hook(state, it)
    ev, cached = timed(eval_stage, f"eval-after-{cfg.iterations}", cfg.iterations, checkpoint)
    acc.add_stage(ev)
    after = ev.value
    say.evaluated("after", after)
    tracker.log_step(cfg.iterations, {"eval.success_rate_before": before["success_rate"],
                                      "eval.success_rate": after["success_rate"],
                                      "eval.ci95_low": after["ci95"][0], "eval.ci95_high": after["ci95"][1]})
    items = checklist_mod.fill(state, acc, tracker, before, after)
    tracker.set_tags(_checklist_tags(state, items))
    tracker.set_tags({"creditflow.success_before": f"{before['success_rate']:.4f}",
                      "creditflow.success_after": f"{after['success_rate']:.4f}"})
    tracker.log_json(checklist_mod.as_json(items), "checklist.json")
    tracker.finish("FINISHED")
    state.info["status"] = "finished"
    state.save_info()
    return {
        "run_id": state.run_id,
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracker.uri,
        "experiment": cfg.tracking.experiment,
        "success_before": before["success_rate"],
        "success_after": after["success_rate"],
        "checklist": items,
    }


def _rebuild_checkpoint(state: RunState, run: Callable, tracker: Tracker, it: int, bad: str,
                        prev: Optional[tuple[StageResult, StageResult, str]], exc: CheckpointError) -> str:
    """Recover from a checkpoint that fails verification on resume (truncated, bit rot).

    The checkpoint that iteration ``it`` starts from is the output of the previous iteration's
    update (or of prepare). Its inputs are all still here: the previous checkpoint (kept by
    ``prune_checkpoints``, which never keeps fewer than two) and that iteration's persisted
    reward and credit results. So the update is re-run on exactly those inputs with the same
    seed, and the rebuilt weights are compared with the sha256 sums the lost checkpoint's
    manifest recorded. Only a bit-identical rebuild is accepted: then nothing is lost and every
    persisted result of later stages stays valid. Otherwise (the manifest itself is unreadable,
    or the rebuild differs) the resume stops with an error that says what to do, rather than
    continuing from weights the persisted results were not computed with."""
    from stages.update.checkpoint import MANIFEST, verify_checkpoint

    bad_path = Path(bad)
    recorded: Optional[dict[str, str]] = None
    try:
        files = json.loads((bad_path / MANIFEST).read_text())["files"]
        recorded = {k: v["sha256"] for k, v in files.items() if k.endswith(".safetensors")}
    except Exception:
        recorded = None
    print(f"\nwarning: {exc}\n  rebuilding it from the previous checkpoint", file=sys.stderr)
    if prev is None:  # the init checkpoint: prepare is deterministic given the home's model cache
        state.policy, state.policy_version = None, None
        producer, args, source = (prepare_stage, "prepare", -1), (), "the base policy"
    else:
        reward, credit, before = prev
        try:
            verify_checkpoint(Path(before))
        except CheckpointError as exc2:
            raise CheckpointError(
                f"{exc}; the checkpoint before it is unusable too ({exc2}), so it cannot be rebuilt. The run "
                f"cannot be resumed losslessly; start a new run (same config) instead", bad_path) from None
        producer, args, source = (update_stage, f"it{it - 1}-update", it - 1), (reward.value, credit.value, before), before
    result, _ = run(*producer, *args, refresh=True)
    rebuilt = Path(result.value["checkpoint"])
    manifest = verify_checkpoint(rebuilt)
    now = {k: v["sha256"] for k, v in manifest["files"].items() if k.endswith(".safetensors")}
    how = f"re-ran {producer[1]} from {source} with its persisted inputs"
    if recorded is None or recorded != now:
        why = ("the lost checkpoint's manifest is unreadable, so the rebuild cannot be shown identical"
               if recorded is None else "the rebuilt weights differ from the sha256 sums the lost checkpoint recorded")
        raise CheckpointError(
            f"{exc}; {how}, but {why}. Stages after it may have used the lost weights, so the resume stops. "
            f"To continue from the rebuilt weights anyway, delete the persisted results of iteration {it} onwards "
            f"({state.paths.results}/{state.run_id}-it{it}-* and later) and resume again", bad_path)
    note = f"{how}; weights bit-identical to the lost checkpoint (sha256 {sorted(now.values())[0][:16]}...)"
    tracker.set_tags({f"creditflow.recovered.{bad_path.name}": f"{exc}"[:300] + f" -> {note}"})
    print(f"  recovered {bad_path}: {note}", file=sys.stderr)
    return str(rebuilt)


def _recommendation_tags(state: RunState) -> dict[str, str]:
    """Was the chosen method among the decision tree's candidates for this task (survey §7.5)?"""
    from stages.credit import decision_tree

    profile = state.family.profile()
    if profile is None:
        return {"creditflow.method_in_recommended": "unknown (task family declares no profile)"}
    recs = decision_tree.recommend(decision_tree.TaskProfile.from_dict(profile), top_k=5)
    names = [r.method for r in recs]
    return {
        "creditflow.task_profile": json.dumps(profile, sort_keys=True),
        "creditflow.recommended_methods": ",".join(names),
        "creditflow.method_in_recommended": str(state.obj.credit.method in names).lower(),
    }


def _sandbox_tags(state: RunState) -> dict[str, str]:
    """Which sandbox backend the run's environments execute in, and the image (its digest)."""
    if not state.family.needs_sandbox:
        return {"creditflow.sandbox": "none (the task family executes no code)"}
    backend = state.sandbox_backend
    tags = {"creditflow.sandbox": str(getattr(backend, "chosen", backend.name)),
            "creditflow.sandbox.requested": str(getattr(backend, "requested", state.obj.sandbox.backend))}
    digest = getattr(backend, "image_digest", None)
    if digest:
        tags["creditflow.sandbox.image"] = str(getattr(backend, "image", state.obj.sandbox.image))
        tags["creditflow.sandbox.image_digest"] = str(digest)
    return tags


def _checklist_tags(state: RunState, items: list) -> dict[str, str]:
    return {**checklist_mod.as_tags(items), **{k: str(v) for k, v in getattr(state, "_checklist_raw", {}).items()}}


def _iteration_metrics(results: dict[str, StageResult]) -> dict[str, float]:
    m: dict[str, float] = {}
    for stage, r in results.items():
        m[f"time.{stage}_seconds"] = r.wall_seconds
        m[f"time.{stage}_cpu_seconds"] = r.cpu_seconds
        for k, v in r.overhead.as_dict().items():
            if k != "wall_seconds" and v:
                m[f"overhead.{stage}.{k}"] = float(v)
    m["overhead.credit.wall_seconds"] = results["credit"].overhead.wall_seconds
    for k, v in results["env"].stats.items():
        m[f"env.{k}"] = v
    for k, v in results["rollout"].stats.items():
        m[f"rollout.{k}"] = v
    for k, v in results["reward"].stats.items():
        m[f"reward.{k}"] = v
    for k, v in results["credit"].stats.items():
        m[f"credit.{k}"] = v
    for k, v in results["update"].stats.items():
        m[f"update.{k}"] = v
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}


def _log_heatmap(tracker: Tracker, batch: Batch, credit: CreditResult, iteration: int) -> None:
    try:
        from flows.heatmap import credit_heatmap

        fig = credit_heatmap(batch, credit, title=f"iteration {iteration}")
        tracker.log_figure(fig, f"heatmaps/credit_iter_{iteration:04d}.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
    except TrackingUnavailableError:  # the store, not the plot: the run must fail clearly (journal kept)
        raise
    except Exception as exc:  # plotting must never kill training; say why
        print(f"warning: credit heatmap for iteration {iteration} failed: {exc}", file=sys.stderr)
