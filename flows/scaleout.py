"""Scale-out of the rollout stage: shards of the environment batch played on Dask or Ray workers.

``runner.kind=dask`` (or ``ray``) runs the flow on :class:`prefect_dask.DaskTaskRunner`
(:class:`prefect_ray.RayTaskRunner`); ``runner.rollout_shards=N`` makes the rollout stage split the
iteration's :class:`~environments.construct.EnvBatch` into ``N`` shards of *whole groups* (a group
is never split: its members share a baseline, and a start failure drops the whole group) and
submit one Prefect task per shard to that runner. Everything else — env construction, reward,
credit, update, eval, MLflow — stays in the flow process (see ``docs/scaleout.md``).

What moves, per iteration and shard::

    in:  run id + CREDITFLOW_HOME path, the checkpoint path, the shard's EnvSlots (small, picklable),
         the stage seed and temperature
    out: a Batch of Trajectories (token ids, log-probs, entropies, turns), its Overhead, token count

A worker never receives weights over the wire: it reads the run's ``config.yaml`` and the
checkpoint from the run directory, so **CREDITFLOW_HOME must be shared storage mounted at the same
path on every node** (NFS, a shared volume). It keeps one :class:`ShardContext` per process
(family, tokenizer, policy, engine, sandbox backend) and reloads weights only when the checkpoint
path changes. Sandboxes are created on the worker, from the worker's own Docker engine or process
backend.

Shard invariance: a shard's trajectories must not depend on which other episodes share its
engine batch. The agent loop gives every request its own seed (``seed, uid, turn``); vLLM honours
per-request seeds, but :class:`~stages.rollout.hf_engine.HFEngine` seeds one generator from the
whole batch, so the same episode samples differently in a different batch. Both engines sample every
request from its own seed (``HFEngine``: inverse-CDF sampling with one uniform per (request seed,
decode step) from a counter-based hash) — a row's sample depends on its own seed and logits only. With it, the merged
result is the same for 1 shard or N, in-process or on a cluster (tokens identical, log-probs equal
to float error: a row's logits do not depend on the other rows beyond ~1e-7).
"""

from __future__ import annotations

import atexit
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from environments.construct import EnvBatch, EnvSlot
from stages.rollout.hf_engine import HFEngine
from flows.runner_config import RUNNER_KINDS, RunnerConfig  # noqa: F401  (re-exported; a light module the config loader imports)
from stages.schema import Batch, Overhead


def make_task_runner(cfg: RunnerConfig) -> Any:
    """The Prefect task runner ``runner.kind`` names, or ``None`` for the flow's default (local).

    Raises ``ImportError`` naming the extra to install when the integration is missing."""
    if cfg.kind == "local":
        return None
    if cfg.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:
            raise ImportError(f"runner.kind=dask needs prefect-dask: pip install -e '.[dask]' ({exc})") from None
        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        # processes, one thread each: torch and the environments get a process of their own
        return DaskTaskRunner(cluster_kwargs={"n_workers": int(cfg.workers), "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if cfg.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise ImportError(f"runner.kind=ray needs prefect-ray: pip install -e '.[ray]' ({exc})") from None
        if cfg.address:
            return RayTaskRunner(address=cfg.address)
        return RayTaskRunner(init_kwargs={"num_cpus": int(cfg.workers), "include_dashboard": False})
    raise ValueError(f"config key 'runner.kind': unknown runner {cfg.kind!r}; one of {', '.join(RUNNER_KINDS)}")


def with_runner(flow_obj: Any, cfg: RunnerConfig) -> Any:
    """``flow_obj`` on the task runner ``cfg`` names (unchanged for ``local``)."""
    runner = make_task_runner(cfg)
    return flow_obj if runner is None else flow_obj.with_options(task_runner=runner)


# ---------------------------------------------------------------------------------- sharding
def shard_slots(slots: list[EnvSlot], n: int) -> list[list[EnvSlot]]:
    """Split ``slots`` into at most ``n`` non-empty shards of whole groups, balanced by episode count.

    Groups keep the order of their first slot and stay together; shards are contiguous runs of
    groups, so concatenating the shards gives the slots grouped as before. Fewer groups than
    ``n`` gives one shard per group."""
    if n < 1:
        raise ValueError(f"runner.rollout_shards must be >= 1, got {n}")
    groups: dict[int, list[EnvSlot]] = {}
    for s in slots:
        groups.setdefault(s.group_id, []).append(s)
    members = list(groups.values())
    n = min(n, len(members))
    if n <= 1:
        return [list(slots)] if slots else []
    total = len(slots)
    shards: list[list[EnvSlot]] = []
    current: list[EnvSlot] = []
    done = 0  # episodes in finished shards
    for i, group in enumerate(members):
        current.extend(group)
        left_groups = len(members) - i - 1
        left_shards = n - len(shards) - 1
        # close the shard once it reaches its share of what is left (and enough groups remain for the rest)
        target = (total - done) / (left_shards + 1)
        if left_shards > 0 and (len(current) >= target or left_groups == left_shards):
            shards.append(current)
            done += len(current)
            current = []
    if current:
        shards.append(current)
    return shards


# ---------------------------------------------------------------------------------- worker side
class ShardContext:
    """What :func:`flows.providers.run_slots` needs of a run, built on a worker from the run
    directory: ``obj``, ``family``, ``tokenizer``, ``engine``, ``sandbox_backend``."""

    def __init__(self, run_id: str, home: str):
        from flows.runtime import RunState
        from stages.rollout.policy import get_policy

        run = RunState.open(run_id, Path(home))  # reads config.yaml (and checks its hash)
        self.run_id, self.home, self.obj, self.family = run_id, home, run.obj, run.family
        torch.manual_seed(self.obj.seed)
        model, tokenizer, _ = get_policy(self.obj.model, self.family, Path(home), self.obj.seed, self.obj.rollout)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.obj.model.dtype]
        self.policy = model.to(device=run.device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.engine = self._make_engine()
        self.version: Optional[str] = None
        self.lock = threading.Lock()
        self._backend: Any = None

    def _make_engine(self) -> Any:
        r = self.obj.rollout
        if r.engine == "hf":
            return HFEngine(self.policy, pad_token_id=getattr(self.tokenizer, "pad_token_id", None))
        from stages.rollout.engines import make_engine

        # vllm: per-request seeds already; with vllm_url the worker is one more client of the shared server
        return make_engine(r, self.policy, self.tokenizer, seed=self.obj.seed)

    @property
    def server_engine(self) -> bool:
        return self.obj.rollout.engine == "vllm" and bool(self.obj.rollout.vllm_url)

    def ensure_checkpoint(self, checkpoint: str) -> None:
        """Load the policy weights of ``checkpoint`` (verified) unless they are loaded already."""
        if self.version == checkpoint:
            return
        if not self.server_engine:  # a vLLM server gets its weights from the flow process (update stage)
            from stages.update.checkpoint import load_checkpoint

            load_checkpoint(Path(checkpoint), self.policy)
            self.engine.sync_weights(self.policy)
        self.version = checkpoint

    @property
    def sandbox_backend(self) -> Any:
        """This worker's sandbox backend (its own Docker engine or process backend), made on first use."""
        if self._backend is None:
            from environments.sandbox import make_backend

            base = Path(tempfile.gettempdir()) / "creditflow-sandboxes" / f"{self.run_id}-{os.getpid()}"
            self._backend = make_backend(self.obj.sandbox, base_dir=str(base))
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            try:
                self._backend.close()
            finally:
                self._backend = None


_CONTEXTS: dict[tuple[str, str], ShardContext] = {}
_CONTEXTS_LOCK = threading.Lock()


def worker_context(run_id: str, home: str) -> ShardContext:
    """The process's :class:`ShardContext` for a run (built once; another run's is closed first)."""
    key = (str(home), run_id)
    with _CONTEXTS_LOCK:
        ctx = _CONTEXTS.get(key)
        if ctx is None:
            for other in list(_CONTEXTS):
                _CONTEXTS.pop(other).close()
            ctx = _CONTEXTS[key] = ShardContext(run_id, str(home))
        return ctx


@atexit.register
def _close_contexts() -> None:
    for ctx in list(_CONTEXTS.values()):
        try:
            ctx.close()
        except Exception:  # best effort at interpreter exit; the backends' own cleanup removes leftovers
            pass
    _CONTEXTS.clear()


@dataclass
class ShardResult:
    """What one shard sends back to the flow process."""

    batch: Batch
    overhead: Overhead
    generated_tokens: int
    host: str = ""
    pid: int = 0


def play_shard(run_id: str, home: str, checkpoint: str, slots: list[EnvSlot], family: str, seed: int,
               temperature: float) -> ShardResult:
    """Play ``slots`` with the policy of ``checkpoint`` in this process (the shard task's body).

    A shard whose every group fails to start returns an empty batch that says so (the stage fails
    only if *every* shard does, as the unsharded stage fails only if every group does)."""
    import socket

    from flows.providers import EnvStartError, run_slots

    ctx = worker_context(run_id, home)
    with ctx.lock:  # one shard at a time per context (threads of a local runner share it)
        ctx.ensure_checkpoint(checkpoint)
        try:
            batch, overhead, tokens = run_slots(ctx, slots, family, seed, temperature)
        except EnvStartError as exc:
            groups = len({s.group_id for s in slots})
            retries = int(ctx.obj.rollout.env_start_retries)
            batch = Batch(trajectories=[], meta={"dropped_groups": groups, "start_failures": groups * (retries + 1),
                                                 "failure_reasons": [str(exc)[:300]], "all_failed": True})
            overhead, tokens = Overhead(), 0
    return ShardResult(batch=batch, overhead=overhead, generated_tokens=tokens, host=socket.gethostname(),
                       pid=os.getpid())


class Slots:
    """A shard's slots as one opaque parameter: Prefect does not walk it looking for futures, and it
    pickles as itself (``prefect.utilities.annotations.quote`` does not survive pickling to a worker
    in Prefect 3.8: it comes back wrapped twice)."""

    __slots__ = ("slots",)

    def __init__(self, slots: list[EnvSlot]):
        self.slots = list(slots)

    def __getstate__(self) -> list[EnvSlot]:
        return self.slots

    def __setstate__(self, state: list[EnvSlot]) -> None:
        self.slots = state

    def __repr__(self) -> str:  # what the Prefect UI shows as the parameter
        return f"Slots({len(self.slots)} episodes, groups {sorted({s.group_id for s in self.slots})})"


def _shard_task() -> Any:
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def rollout_shard(index: int, run_id: str, home: str, checkpoint: str, slots: Slots, family: str,
                      seed: int, temperature: float) -> ShardResult:
        """One shard of the rollout stage (whole groups), played on whichever worker runs it."""
        return play_shard(run_id, home, checkpoint, slots.slots, family, seed, temperature)

    # not persisted and not cached: the rollout stage persists the merged batch under its own key
    return task(name="rollout-shard", task_run_name="rollout-shard-{index}", cache_policy=NO_CACHE,
                persist_result=False, retries=0)(rollout_shard)


#: the Prefect task each shard runs as (submitted to the flow's task runner)
rollout_shard = _shard_task()


def merge_shards(slots: list[EnvSlot], results: list[ShardResult]) -> tuple[Batch, Overhead, int]:
    """One batch in slot order from the shards' results (as the unsharded stage would return it)."""
    from flows.providers import EnvStartError

    order = {s.uid: i for i, s in enumerate(slots)}
    trajs = sorted((t for r in results for t in r.batch.trajectories), key=lambda t: order[t.uid])
    meta: dict[str, Any] = {"dropped_groups": 0, "start_failures": 0, "failure_reasons": []}
    overhead, tokens = Overhead(), 0
    for r in results:
        for k in ("dropped_groups", "start_failures"):
            meta[k] += int(r.batch.meta.get(k, 0))
        meta["failure_reasons"].extend(r.batch.meta.get("failure_reasons", []))
        overhead = overhead + r.overhead
        tokens += r.generated_tokens
    if slots and not trajs:
        raise EnvStartError(f"every group's environment failed to start ({meta['start_failures']} attempts); "
                            f"last error: {meta['failure_reasons'][-1] if meta['failure_reasons'] else '?'}")
    meta["shards"] = len(results)
    meta["shard_workers"] = sorted({f"{r.host}:{r.pid}" for r in results})  # where the shards ran
    return Batch(trajectories=trajs, meta=meta), overhead, tokens


def rollout_sharded(run_id: str, home: str, envb: EnvBatch, checkpoint: str, seed: int, temperature: float,
                    shards: int) -> tuple[Batch, Overhead, int]:
    """Play ``envb`` as ``shards`` shards of whole groups and merge them in slot order.

    Inside a flow run each shard is a ``rollout-shard`` task submitted to the flow's task runner
    (Dask/Ray workers, or threads of the default runner); all shards are awaited before a failure
    is raised, so a failed shard fails the stage with nothing left running. Outside a flow
    (:func:`flows.api.run_plain`) the shards are played one after another in this process."""
    from prefect.context import FlowRunContext
    from prefect.futures import wait

    parts = shard_slots(envb.slots, shards)
    if FlowRunContext.get() is None:
        results = [play_shard(run_id, str(home), checkpoint, p, envb.family, seed, temperature) for p in parts]
        return merge_shards(envb.slots, results)
    futures = [rollout_shard.submit(i, run_id, str(home), checkpoint, Slots(p), envb.family, seed, temperature)
               for i, p in enumerate(parts)]
    wait(futures)
    return merge_shards(envb.slots, [f.result() for f in futures])
