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

import os
import resource
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402
import torch  # noqa: E402

from environments.construct import EnvBatch, build_env_batch  # noqa: E402
from flows import checklist as checklist_mod  # noqa: E402
from flows import reporting, secrets  # noqa: E402
from flows.progress import PRELUDE, RunProgress, for_console  # noqa: E402
from flows.providers import build_context  # noqa: E402
from flows.recovery import rebuild_checkpoint  # noqa: E402
from flows.runtime import RunState  # noqa: E402
from flows.scaleout import rollout_sharded, with_runner  # noqa: E402
from flows.tracking import Tracker  # noqa: E402
from stages.benchmark.budget import Spend, credit_spend, exhausted, iteration_spend, stage_spend  # noqa: E402
from stages.credit.stats import credit_statistics  # noqa: E402
from stages.reward.verifier import compute_rewards  # noqa: E402
from stages.rollout.policy import pad_token_id  # noqa: E402
from stages.schema import Batch, CreditResult, Overhead  # noqa: E402
from stages.update.checkpoint import CheckpointError, checkpoint_version  # noqa: E402

STAGES = ("env", "rollout", "reward", "credit", "update")

#: live run states of this process, by run id. The entry points (:mod:`flows.api`) register the run
#: they created or opened, the flow and its stage tasks look it up by the ``run_id`` parameter.
#: A registry rather than a task argument: a task's parameters are what Prefect sees (the UI, the
#: task runner, the cache key function) and a RunState (policy, engine, sandboxes) must never be
#: hashed, pickled or shipped; the run id is the small, serialisable handle of it.
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
    """The persisted result record exists and (for a freshly written one) is complete: Prefect
    writes it as one JSON object, so a record cut short by a full disk does not end with ``}``
    (its tail is read, not the whole record: a rollout's record is the size of the batch)."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if check_content:
        if size == 0:
            return False
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 64))
            if not fh.read().rstrip().endswith(b"}"):
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
            state.record_execution(iteration, name, stage_key)
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
    return curriculum_for(prev["env"], prev["credit"])


def _run_episodes(state: RunState, envb: EnvBatch, seed: int, temperature: float) -> tuple[Batch, Overhead, int]:
    """Play the slots of ``envb`` (live environments and sandboxes made and closed around it)."""
    return state.player.play(envb.slots, seed, temperature)


@_stage("rollout")
def rollout_stage(state: RunState, iteration: int, envb: EnvBatch, checkpoint: str) -> StageResult:
    """Stage 2: multi-turn rollouts with the policy ``checkpoint`` holds (the engine named by
    rollout.engine): the current policy, or with ``rollout.max_staleness >= 1`` a frozen copy of an
    older checkpoint (the rollout lane of :class:`AsyncRollouts`, on the flow's task runner).
    Every trajectory records the policy version it was sampled with (``meta["policy_version"]``)."""
    seed, temperature, runner = state.seed_for(iteration, "rollout"), state.obj.rollout.temperature, state.obj.runner
    cached0 = None
    if state.obj.rollout.max_staleness:
        torch.set_num_threads(state.rollout_threads)  # this worker thread's share of the cores
        with state.behaviour_lock:  # one frozen copy: the lane's rollouts never overlap
            batch, overhead, gen_tokens = state.behaviour_player(checkpoint).play(envb.slots, seed, temperature)
    elif runner.kind == "local" and runner.rollout_shards == 1:
        state.ensure_policy(checkpoint)  # also brings a vLLM server (rollout.vllm_url) to this checkpoint
        # vLLM's prefix-cache hits, when this process's engine plays the episodes (shards use their own)
        cached0 = state.engine.stats.get("cached_prompt_tokens")
        batch, overhead, gen_tokens = _run_episodes(state, envb, seed, temperature)
    else:  # shards of whole groups, one task each on the flow's task runner (flows/scaleout.py)
        state.ensure_policy(checkpoint)  # also brings a vLLM server (rollout.vllm_url) to this checkpoint
        batch, overhead, gen_tokens = rollout_sharded(state.run_id, str(state.home), envb, checkpoint, seed,
                                                      temperature, runner.rollout_shards)
    batch.iteration = iteration
    version = checkpoint_version(checkpoint)
    batch.meta["policy_version"] = version
    for t in batch.trajectories:
        t.meta["policy_version"] = version
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
        "policy_version": float(version),
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


class AsyncRollouts:
    """Bounded-staleness asynchronous rollouts (``rollout.max_staleness = N >= 1``; survey §8.2).

    The schedule is fixed, not a race: iteration k's rollout samples the checkpoint written by
    update ``k-1-N`` (``init`` for k <= N), so its policy is exactly ``min(k, N)`` versions older
    than the checkpoint update k starts from — the bound prime-rl calls ``async_level`` (its
    orchestrator waits for checkpoint ``step - async_level``), where SkyRL's and AReaL's fully-async
    trainers only bound it (they admit a trajectory when its version is within the limit). A fixed
    schedule keeps every stage a function of persisted inputs, so the cache keys, a resumed run and
    a re-run give the same results whatever the threads' timing.

    At the start of iteration k the flow's thread builds the environment batches of iterations
    ``k .. k+N`` not built yet (cheap; each from the curriculum of the credit stages done by then:
    iteration ``j-1-N`` and before, :func:`curriculum_for`) and hands their rollouts to the flow's
    task runner (``Task.submit``: the rollout lane), each waiting for the one before (one frozen
    behaviour copy, :meth:`RunState.behaviour_player`). Then it waits for rollout k and runs
    reward, credit and update k itself (the learner) while the lane samples iterations k+1.. on the
    other cores. Rollouts of iterations beyond a budget stop are waited for and discarded."""

    def __init__(self, state: RunState, staged: Callable[..., StageResult], submit: Callable, init_checkpoint: str):
        self.state, self.staged, self.submit = state, staged, submit
        self.n = int(state.obj.rollout.max_staleness)
        self.checkpoints: dict[int, str] = {-1: init_checkpoint}  # update k's output (-1: prepare's)
        self.envs: dict[int, StageResult] = {}
        self.credits: dict[int, StageResult] = {}
        self.pending: dict[int, Callable[[], StageResult]] = {}
        self.last_future: Any = None
        # two lanes on the cores: the rollout worker thread takes half of torch's intra-op threads
        self.learner_threads0 = torch.get_num_threads()
        state.rollout_threads = max(1, self.learner_threads0 - self.learner_threads0 // 2)
        torch.set_num_threads(max(1, self.learner_threads0 // 2))
        state.prepare_behaviour()

    def behaviour_checkpoint(self, j: int) -> str:
        return self.checkpoints[max(j - 1 - self.n, -1)]

    def _hand_out(self, j: int) -> None:
        curriculum = curriculum_for(self.envs.get(j - 1), self.credits.get(j - 1 - self.n))
        env = self.staged(env_stage, f"it{j}-env", j, curriculum)
        self.envs[j] = env
        wait = self.submit(rollout_stage, f"it{j}-rollout", j, env.value, self.behaviour_checkpoint(j),
                           wait_for=[self.last_future] if self.last_future is not None else None)
        self.last_future = wait.future
        self.pending[j] = wait

    def iteration(self, it: int, checkpoint: str) -> dict[str, StageResult]:
        """Iteration ``it`` of the five stages, its update starting from ``checkpoint``."""
        self.checkpoints[it - 1] = checkpoint
        for j in range(it, min(it + self.n, self.state.obj.iterations - 1) + 1):
            if j not in self.pending and j not in self.credits:
                self._hand_out(j)
        rollout = self.pending.pop(it)()
        reward = self.staged(reward_stage, f"it{it}-reward", it, rollout.value)
        credit = self.staged(credit_stage, f"it{it}-credit", it, reward.value, checkpoint, self.envs[it].value)
        update = self.staged(update_stage, f"it{it}-update", it, reward.value, credit.value, checkpoint)
        self.credits[it] = credit
        return {"env": self.envs[it], "rollout": rollout, "reward": reward, "credit": credit, "update": update}

    def close(self) -> None:
        """Wait for the rollouts still in flight (a budget stop's surplus), restore the threads."""
        for j in sorted(self.pending):
            try:
                self.pending.pop(j).future.wait()
            except Exception:  # a surplus rollout's failure does not concern the finished run
                pass
        torch.set_num_threads(self.learner_threads0)


def curriculum_for(env: Optional[StageResult], credit: Optional[StageResult]) -> dict[str, float]:
    """The curriculum an environment stage samples by: the environment batch before it's curriculum
    updated with the scores of the newest credit stage it may see (synchronous: both of the last
    iteration, :func:`next_curriculum`; asynchronous: the credit stage of ``max_staleness`` iterations
    earlier, the newest done when the environment is built)."""
    return {**(getattr(env.value, "curriculum", {}) if env else {}),
            **(getattr(credit.value, "curriculum", {}) if credit else {})}


@_stage("credit")
def credit_stage(state: RunState, iteration: int, batch: Batch, checkpoint: str, envb: EnvBatch) -> StageResult:
    """Stage 4: the configured credit-assignment method, given what it declared it needs."""
    pad = pad_token_id(state.tokenizer)
    ctx, ctx_overhead = build_context(state, envb, batch, iteration, checkpoint, pad)
    tensors = batch.to_tensors(pad_token_id=pad)
    result: CreditResult = state.method(tensors, batch, ctx)
    result.overhead = result.overhead + ctx_overhead
    stats = credit_statistics(tensors, result, batch)
    return StageResult(value=result, stats=stats, overhead=result.overhead)


@_stage("update")
def update_stage(state: RunState, iteration: int, batch: Batch, credit: CreditResult, checkpoint: str) -> StageResult:
    """Stage 5: policy update (PPO-clip / GRPO loss), atomic checkpoint."""
    from stages.update.checkpoint import prune_checkpoints, save_checkpoint

    state.ensure_policy(checkpoint)
    tensors = batch.to_tensors(pad_token_id=pad_token_id(state.tokenizer))
    staleness = staleness_stats(batch, checkpoint, state.obj.rollout.max_staleness)
    stats = state.trainer.update(tensors, credit, seed=state.seed_for(iteration, "update"))
    stats.update(staleness)
    # the credit method's trained helpers (SPA-RL's progress estimator) learn from this iteration too
    stats.update(state.method.update_helpers(credit, seed=state.seed_for(iteration, "helpers")))
    path = save_checkpoint(
        state.paths.checkpoints, f"iter_{iteration:04d}", state.policy, state.trainer.critic,
        state.trainer.optim_state(), meta={"iteration": iteration, "run_id": state.run_id, "stats": stats},
        before_rename=lambda: state.maybe_crash(iteration, "checkpoint"), helpers=state.method.helper_modules(),
    )
    state.adopt_checkpoint(str(path))
    # engines that keep their own copy of the weights (vLLM) sample from the new policy from now on
    stats["engine_sync_seconds"] = float(state.engine.sync_weights(state.policy))
    prune_checkpoints(state.paths.checkpoints, keep=keep_checkpoints(state.obj))
    return StageResult(value={"checkpoint": str(path)}, stats=stats)


def staleness_stats(batch: Batch, checkpoint: str, max_staleness: int) -> dict[str, float]:
    """How many updates old the policy that sampled each trajectory is, against the policy version
    the update starts from (``checkpoint``): mean and max over the batch. More than ``max_staleness``
    (or a trajectory from the future) is a bug of the schedule, raised before the update."""
    learner = checkpoint_version(checkpoint)
    stale = torch.tensor([learner - int(t.meta.get("policy_version", learner)) for t in batch.trajectories] or [0])
    if int(stale.max()) > max_staleness or int(stale.min()) < 0:
        raise RuntimeError(f"rollouts of policy versions {sorted({learner - int(s) for s in stale.tolist()})} reached "
                           f"the update of version {learner}: staleness outside [0, rollout.max_staleness={max_staleness}]")
    return {"staleness_mean": float(stale.float().mean()), "staleness_max": float(stale.max())}


def keep_checkpoints(cfg: Any) -> int:
    """Checkpoints the update keeps on disk: ``update.keep_checkpoints``, never fewer than two
    (checkpoint recovery rebuilds the newest from the one before) nor than the rollout lane of an
    asynchronous run may still load (``rollout.max_staleness + 1``: the versions it samples from)."""
    return max(cfg.update.keep_checkpoints, 2, cfg.rollout.max_staleness + 1)


@_stage("eval")
def eval_stage(state: RunState, iteration: int, checkpoint: str) -> StageResult:
    """Success rate on the eval split (same eval episodes before and after training: paired)."""
    state.ensure_policy(checkpoint)
    cfg = state.obj
    pool = getattr(cfg.env, "eval_size", cfg.eval_episodes)
    envb = build_env_batch(state.family, cfg.eval_episodes, 1, pool, iteration=10**6, seed=cfg.seed, split="eval")
    batch, overhead, gen_tokens = _run_episodes(state, envb, seed=state.seed_for(10**6, "eval"),
                                                temperature=cfg.eval_temperature)
    batch, stats, _ = compute_rewards(batch, state.family)
    n = len(batch)
    lo, hi = checklist_mod.wilson_interval(sum(t.success for t in batch.trajectories), n)
    # its compute, reported apart from the budget (stages/benchmark/budget.py: uncharged)
    spend = {"generated_tokens": float(gen_tokens), "forward_tokens": float(batch.token_count())}
    return StageResult(value={"success_rate": stats["success_rate"], "ci95": (lo, hi), "episodes": n},
                       stats={"success_rate": stats["success_rate"], "ci95_low": lo, "ci95_high": hi, **spend},
                       overhead=overhead)


def _uncharged(total: Spend, result: StageResult) -> Spend:
    """``total`` plus what the prepare or eval stage ``result`` spent (measured, not charged to the budget)."""
    return total + stage_spend(result.stats, result.overhead.as_dict(), result.wall_seconds, result.cpu_seconds)


# ---------------------------------------------------------------------------- the flow
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
    secrets.install_log_filter(state.cfg)  # also registers the names of its *_env keys
    logger = get_run_logger()
    storage = state.paths.results
    storage.mkdir(parents=True, exist_ok=True)
    configured: dict[tuple[str, bool], Any] = {}

    def configured_task(stage_task: Any, refresh: bool) -> Any:
        key = (stage_task.name, refresh)
        if key not in configured:  # one configured copy per stage task, not a new Task per call
            configured[key] = stage_task.with_options(result_storage=storage, refresh_cache=refresh)
        return configured[key]

    def run(stage_task: Any, stage_key: str, iteration: int, *args: Any, refresh: bool = False
            ) -> tuple[StageResult, bool]:
        """Run (or load from the persisted cache) one stage; also say whether it was cached.
        ``refresh`` re-runs it and overwrites its persisted result (checkpoint recovery)."""
        before = state.executed_keys[stage_key]
        result = configured_task(stage_task, refresh)(state.run_id, stage_key, state.chash, iteration,
                                                      *[quote(a) for a in args])
        return result, finished(stage_key, before)

    def submit(stage_task: Any, stage_key: str, iteration: int, *args: Any, wait_for: Optional[list] = None
               ) -> Callable[[], tuple[StageResult, bool]]:
        """:func:`run` on the flow's task runner (``Task.submit``): returns the call that waits for
        the stage and gives what :func:`run` gives (asynchronous rollouts)."""
        before = state.executed_keys[stage_key]
        future = configured_task(stage_task, False).submit(state.run_id, stage_key, state.chash, iteration,
                                                           *[quote(a) for a in args], wait_for=wait_for or [])

        def wait() -> tuple[StageResult, bool]:
            result = future.result()
            return result, finished(stage_key, before)

        wait.future = future  # type: ignore[attr-defined]  (the next rollout of the lane waits for it)
        return wait

    def finished(stage_key: str, before: int) -> bool:
        """Whether the stage ``stage_key`` came from the persisted cache (its body did not run since
        ``before`` was read); a result that could not be persisted stops the run here."""
        cached = state.executed_keys[stage_key] == before
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
        return cached

    tracker = reporting.open_tracker(state, logger)
    try:
        return _iterate(state, say, run, tracker, submit)
    except BaseException as exc:
        reporting.report_failure(state, tracker, exc)
        raise


def _iterate(state: RunState, say: RunProgress, run: Callable, tracker: Tracker,
             submit: Optional[Callable] = None) -> dict[str, Any]:
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
    uncharged = {"prepare": _uncharged(Spend(), prep)}
    state.model_info = prep.value["model"]
    checkpoint = prep.value["checkpoint"]
    say.prepared(str(state.model_info.get("name")), int(state.model_info.get("num_parameters", 0)), cached)
    ev, cached = timed(eval_stage, "eval-before", PRELUDE, checkpoint)
    acc.add_stage(ev)
    uncharged["eval"] = _uncharged(Spend(), ev)
    before = ev.value
    say.evaluated("before", before)

    lane = None
    if cfg.rollout.max_staleness:  # bounded-staleness asynchronous rollouts
        lane = AsyncRollouts(state, staged, _timed_submit(say, submit), checkpoint)
    try:
        return _loop(state, say, run, tracker, lane, staged, timed, acc, uncharged, before, checkpoint)
    finally:
        if lane is not None:  # also when the learner failed: no rollout outlives the flow
            lane.close()


def _timed_submit(say: RunProgress, submit: Callable) -> Callable:
    """``submit`` with the progress display told when the stage is handed to the task runner and
    when the flow has its result (both from the flow's thread)."""

    def timed_submit(stage_task: Any, stage_key: str, iteration: int, *args: Any, wait_for: Optional[list] = None):
        say.stage_started(iteration, stage_task.name)
        wait = submit(stage_task, stage_key, iteration, *args, wait_for=wait_for)

        def result() -> StageResult:
            out, cached = wait()
            say.stage_done(iteration, stage_task.name, out.wall_seconds, cached)
            return out

        result.future = wait.future  # type: ignore[attr-defined]
        return result

    return timed_submit


def _loop(state: RunState, say: RunProgress, run: Callable, tracker: Tracker, lane: Optional["AsyncRollouts"],
          staged: Callable, timed: Callable, acc: Any, uncharged: dict[str, Spend], before: dict[str, Any],
          checkpoint: str) -> dict[str, Any]:
    cfg = state.obj
    prev: Optional[tuple[StageResult, StageResult, str]] = None  # last iteration's reward, credit, input checkpoint
    last: Optional[dict[str, StageResult]] = None  # last iteration's results (its curriculum)
    # the stopping rule (stages/benchmark/budget.py): rebuilt from the (persisted) stage results on resume
    spent, curve, stop_reason, done = Spend(), [], None, 0
    for it in range(cfg.iterations):
        say.iteration_started(it)
        if lane is not None:
            results = lane.iteration(it, checkpoint)
        else:
            try:
                results = run_iteration(staged, it, checkpoint, last)
            except CheckpointError as exc:
                if exc.path is None or Path(exc.path) != Path(checkpoint):
                    raise
                checkpoint = rebuild_checkpoint(state, run, tracker, it, checkpoint, prev, exc,
                                                prepare_task=prepare_stage, update_task=update_stage)
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
        metrics = reporting.iteration_metrics(results)
        it_spend = iteration_spend(metrics, rew.value.token_count(), len(rew.value), cfg.update.epochs)
        if not state.method.charged:  # the oracle: its ground-truth passes are reported apart
            gt = credit_spend(metrics, rew.value.token_count(), len(rew.value))
            it_spend = it_spend - gt
            uncharged["ground_truth"] = uncharged.get("ground_truth", Spend()) + gt
        spent = spent + it_spend
        metrics.update({f"budget.{k}": float(v) for k, v in spent.as_dict().items()})
        stop_reason = exhausted(spent, cfg.budget)
        final = stop_reason is not None or it + 1 == cfg.iterations
        if cfg.eval_every and (it + 1) % cfg.eval_every == 0 and not final:
            mid, _ = timed(eval_stage, f"eval-it{it}", it, checkpoint)
            acc.add_stage(mid)
            uncharged["eval"] = _uncharged(uncharged["eval"], mid)
            metrics.update({f"eval.{k}": v for k, v in mid.stats.items()})
        reporting.log_iteration(state, tracker, it, metrics, rew.value, cred.value, acc, before, final=final)
        done = it + 1
        curve.append(reporting.curve_row(it, spent, metrics))
        reporting.save_budget(state, spent, curve, stop_reason, done, uncharged)
        for hook in ITERATION_HOOKS:
            hook(state, it)
        if stop_reason is not None:
            break
    if lane is not None:
        lane.close()
    ev, cached = timed(eval_stage, f"eval-after-{done}", done, checkpoint)
    acc.add_stage(ev)
    uncharged["eval"] = _uncharged(uncharged["eval"], ev)
    reporting.save_budget(state, spent, curve, stop_reason, done, uncharged)
    after = ev.value
    say.evaluated("after", after)
    state.info["success_before"], state.info["success_after"] = before["success_rate"], after["success_rate"]
    items = reporting.report_finish(state, tracker, acc, before, after, step=done)
    return {
        "run_id": state.run_id,
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracker.uri,
        "experiment": cfg.tracking.experiment,
        "success_before": before["success_rate"],
        "success_after": after["success_rate"],
        "checklist": items,
        "iterations_done": done,
        "stop_reason": stop_reason or f"iterations={cfg.iterations} done",
        "spent": spent.as_dict(),
    }

