"""Live state of one training run inside the flow process (never persisted by Prefect).

Holds what stages need but cannot be pickled cheaply: the task family, the policy and its
tokenizer, the rollout engine, the trainer (optimizer, critic, reference model) and the credit
method. Everything here can be rebuilt from the run directory: ``config.yaml`` plus the latest
checkpoint named by the persisted update results — which is exactly what a resume does.

Run directory layout (``$CREDITFLOW_HOME/runs/<run_id>/``)::

    config.yaml          resolved config            run.json        ids, hashes, links
    results/             Prefect persisted results  checkpoints/    init, iter_0000, ...
    executions.jsonl     one line per stage body actually executed (resume audit)
    tracking_buffer.jsonl  MLflow entries not yet acknowledged by the tracking store (see flows.tracking)
    creditflow.log       library logs and warnings of CLI runs, crash tracebacks (see flows.runlog)
"""

from __future__ import annotations

import collections
import contextlib
import copy
import fcntl
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.base import TaskFamily
from environments.registry import get_family_class
from flows.config import ConfigError, config_hash, load_config, parse_crash_at, to_object
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditMethod
from stages.credit.registry import build_method
from stages.update.checkpoint import load_checkpoint, save_checkpoint


#: one policy build at a time per process (see RunState.build_policy)
_BUILD_LOCK = threading.Lock()


def creditflow_home() -> Path:
    return Path(os.environ.get("CREDITFLOW_HOME", "./.creditflow")).expanduser().resolve()


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("cf-%Y%m%d-%H%M%S-") + secrets.token_hex(3)


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock (it is driving this run right now)."""


def check_tracking(cfg: DictConfig, home: Path) -> None:
    """The configured MLflow tracking server answers (one short request; local stores are not
    checked); :class:`flows.tracking.TrackingServerUnreachable` (a ConfigError) otherwise."""
    from flows.tracking import check_tracking_server, default_tracking_uri

    check_tracking_server(cfg.tracking.mlflow_uri or default_tracking_uri(home))


@dataclass
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def info(self) -> Path:
        return self.root / "run.json"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def executions(self) -> Path:
        return self.root / "executions.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def tracking_buffer(self) -> Path:
        return self.root / "tracking_buffer.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "creditflow.log"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class RunState:
    """The live state of one training run in the flow process (never pickled, never persisted).

    Built from the run directory (:meth:`create` / :meth:`open`); everything in it can be rebuilt
    from ``config.yaml`` plus the checkpoint a stage names. Stage tasks reach it through the
    flow's registry of live runs (:mod:`flows.train`), never through attributes other modules
    attach: every field is declared here.

    Identity and config: ``run_id``, ``home``, ``cfg`` (resolved OmegaConf), ``obj`` (the same as
    typed dataclasses), ``chash`` (config hash: part of every stage's cache key), ``paths``,
    ``info`` (``run.json``). Built from the config: ``family`` (task family), ``method`` (credit
    method). Live objects, made on first use: ``policy``, ``tokenizer``, ``engine``, ``trainer``
    (:meth:`build_policy`), the sandbox backend (:attr:`sandbox_backend`), the frozen reference
    policy (:meth:`reference_policy`) and the LLM judge (:meth:`judge`). Bookkeeping:
    ``policy_version`` (checkpoint the live policy equals), ``model_info``, ``executed_count``
    (stage bodies run by this process: a stage is cached when its key's count in ``executed_keys``
    does not move), and the checklist's ``checklist_raw`` / ``baseline_tags`` (:mod:`flows.checklist`).
    Asynchronous rollouts (``rollout.max_staleness >= 1``): the frozen behaviour copy of the policy
    and its engine (:meth:`behaviour_player`), ``behaviour_version`` (the checkpoint it equals) and
    ``rollout_threads`` (torch intra-op threads of the rollout lane; the learner keeps the rest).
    """

    run_id: str
    home: Path
    cfg: DictConfig
    paths: RunPaths
    info: dict[str, Any]
    obj: Any = field(init=False)
    chash: str = field(init=False)
    family: TaskFamily = field(init=False)
    method: CreditMethod = field(init=False)
    policy: Any = None
    tokenizer: Any = None
    engine: Any = None
    trainer: Any = None
    model_info: dict[str, Any] = field(default_factory=dict)
    policy_version: Optional[str] = None
    executed_count: int = 0
    #: stage key -> stage bodies of that key run by this process (concurrent stages: per key, not a total)
    executed_keys: collections.Counter = field(default_factory=collections.Counter)
    behaviour_version: Optional[str] = None
    rollout_threads: int = 1
    #: raw checklist values other runs compare against (``checklist.fill`` writes them)
    checklist_raw: dict[str, Any] = field(default_factory=dict)
    #: ``report.baseline_run`` -> that run's checklist tags (looked up once per run; None = not found)
    baseline_tags: dict[str, Any] = field(default_factory=dict)
    _sandbox_backend: Any = field(default=None, repr=False)
    _reference: Any = field(default=None, repr=False)
    _judge: Any = field(default=None, repr=False)
    _behaviour: Any = field(default=None, repr=False)
    _behaviour_engine: Any = field(default=None, repr=False)
    _behaviour_tokenizer: Any = field(default=None, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)
    #: held by the rollout lane while it samples from the behaviour copy (one rollout at a time)
    behaviour_lock: Any = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.obj = to_object(self.cfg)
        self.family = get_family_class(self.obj.env.name)(self.obj.env)
        self.method = build_method(self.obj.credit)
        self.chash = config_hash(self.cfg)

    # ------------------------------------------------------------------ creation / lookup
    @classmethod
    def create(cls, cfg: DictConfig, home: Optional[Path] = None, run_id: Optional[str] = None) -> "RunState":
        home = home or creditflow_home()
        run_id = run_id or new_run_id()
        paths = RunPaths(home / "runs" / run_id)
        check_tracking(cfg, home)  # before the run directory exists and before any compute
        if paths.root.exists():
            raise ConfigError(f"run {run_id} already exists at {paths.root}; use `creditflow resume {run_id}`")
        paths.root.mkdir(parents=True)
        _atomic_write(paths.config, OmegaConf.to_yaml(cfg))
        info = {
            "run_id": run_id,
            "created": datetime.now(timezone.utc).isoformat(),
            "config_hash": config_hash(cfg),
            "mlflow_run_id": None,
            "prefect_flow_runs": [],
        }
        _atomic_write(paths.info, json.dumps(info, indent=1))
        return cls(run_id=run_id, home=home, cfg=cfg, paths=paths, info=info)

    @classmethod
    def open(cls, run_id: str, home: Optional[Path] = None, overrides: Optional[list[str]] = None) -> "RunState":
        home = home or creditflow_home()
        paths = RunPaths(home / "runs" / run_id)
        if not paths.config.is_file():
            known = sorted(p.name for p in (home / "runs").glob("*")) if (home / "runs").is_dir() else []
            raise ConfigError(
                f"no run {run_id!r} under {home / 'runs'}" + (f"; known runs: {', '.join(known[-10:])}" if known else "")
            )
        saved = OmegaConf.load(paths.config)
        # an injected crash belongs to the invocation that asked for it, never to the resume
        cfg = load_config(["debug.crash_at=null"] + list(overrides or []), base=saved)
        if config_hash(cfg) != config_hash(saved):
            raise ConfigError(
                "these overrides change what the run computes (its config hash); only iterations, budget, eval, "
                "tracking, report and debug keys may change on resume"
            )
        check_tracking(cfg, home)
        info = json.loads(paths.info.read_text())
        return cls(run_id=run_id, home=home, cfg=cfg, paths=paths, info=info)

    def save_info(self) -> None:
        _atomic_write(self.paths.info, json.dumps(self.info, indent=1))

    def save_config(self) -> None:
        """Rewrite ``config.yaml`` (resume overrides), refused while another process drives the run."""
        with self.locked():
            _atomic_write(self.paths.config, OmegaConf.to_yaml(self.cfg))

    @contextlib.contextmanager
    def locked(self):
        """Exclusive lock on the run directory: two processes never drive the same run."""
        fh = open(self.paths.lock, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RunLockedError(
                f"run {self.run_id} is being driven by another process (lock {self.paths.lock} is held); "
                f"wait for it to finish or stop it, then `creditflow resume {self.run_id}`"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    # ------------------------------------------------------------------ execution audit
    def record_execution(self, iteration: int, stage: str, key: Optional[str] = None) -> None:
        with self._lock:  # the rollout lane of an asynchronous run records from another thread
            self.executed_count += 1
            if key is not None:
                self.executed_keys[key] += 1
            with open(self.paths.executions, "a") as fh:
                fh.write(json.dumps({"iteration": iteration, "stage": stage, "pid": os.getpid(), "t": time.time()}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def executions(self) -> list[dict[str, Any]]:
        if not self.paths.executions.is_file():
            return []
        return [json.loads(line) for line in self.paths.executions.read_text().splitlines() if line.strip()]

    def maybe_crash(self, iteration: int, stage: str) -> None:
        spec = self.cfg.debug.crash_at
        if not spec:
            return
        it, st, mode = parse_crash_at(spec)
        if it == iteration and st == stage:
            if mode == "kill":
                os.kill(os.getpid(), 9)
            raise InjectedCrash(f"injected crash in stage {stage!r} of iteration {iteration} (debug.crash_at={spec})")

    # ------------------------------------------------------------------ live objects
    @property
    def device(self) -> torch.device:
        want = self.cfg.model.device
        if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise ConfigError("model.device=cuda but no CUDA device is available")
            return torch.device("cuda")
        return torch.device("cpu")

    def build_policy(self) -> dict[str, Any]:
        """Build (or load from the home cache) the base policy, tokenizer, engine and trainer
        (:func:`stages.rollout.policy.build_live_policy`: the builder rollout shards use too).
        Runs in threads of one process (benchmark cells) build one at a time: the build seeds
        torch's global generator, which threads share."""
        if self.policy is not None:
            return self.model_info
        with _BUILD_LOCK:
            return self._build_policy()

    def _build_policy(self) -> dict[str, Any]:
        from stages.rollout.policy import build_live_policy
        from stages.update.trainer import PolicyTrainer

        live = build_live_policy(self.obj.model, self.obj.rollout, self.family, self.home, self.obj.seed, self.device)
        self.policy, self.tokenizer, self.engine, self.model_info = live.model, live.tokenizer, live.engine, live.info
        # rollout.engine=vllm keeps its own copy of the weights, synced in ensure_policy and, after
        # every optimizer step, automatically at its next generate
        self.trainer = PolicyTrainer(
            live.model, self.obj.update, temperature=self.obj.rollout.temperature,
            needs_critic="critic" in self.method.needs,
        )
        # the credit method's trained helpers (SPA-RL's progress estimator), checkpointed with the policy
        self.method.bind_policy(live.model)  # a helper may be a copy of the policy (iStar's implicit PRM)
        self.method.build_helpers(int(live.model.config.hidden_size), self.seed_for(-1, "helpers"))
        return self.model_info

    def drop_policy(self) -> None:
        """Forget the live policy's checkpoint and weights: the next :meth:`build_policy` rebuilds
        the base policy (checkpoint recovery re-runs prepare)."""
        self.policy, self.policy_version = None, None

    def adopt_checkpoint(self, path: str) -> None:
        """The live policy now equals the checkpoint at ``path`` (the update stage just wrote it)."""
        self.policy_version = str(path)

    def save_init_checkpoint(self) -> str:
        self.build_policy()
        path = save_checkpoint(
            self.paths.checkpoints, "init", self.policy, self.trainer.critic, self.trainer.optim_state(),
            meta={"iteration": -1, "run_id": self.run_id}, helpers=self.method.helper_modules(),
        )
        self.policy_version = str(path)
        return str(path)

    def ensure_policy(self, checkpoint: str) -> None:
        """Make the live policy (and critic, optimizer state) equal to ``checkpoint``."""
        self.build_policy()
        if self.policy_version == checkpoint:
            return
        _, optim_state = load_checkpoint(Path(checkpoint), self.policy, self.trainer.critic,
                                         self.method.helper_modules())
        self.trainer.load_optim_state(optim_state)
        self.engine.sync_weights(self.policy)
        self.policy_version = checkpoint

    def prepare_behaviour(self) -> None:
        """Asynchronous rollouts: make the frozen behaviour copy of the policy and its own engine
        (called by the flow's thread before the rollout lane starts, so the copy is never taken
        while the learner mutates the policy). The copy never trains: no grad, eval mode."""
        self.build_policy()
        if self._behaviour is not None:
            return
        from stages.rollout.engines import make_engine

        self._behaviour = copy.deepcopy(self.policy).eval().requires_grad_(False)
        # the lane encodes observations with a tokenizer of its own: a fast tokenizer is one Rust
        # object, and the learner's credit stage (prompts, decoding) uses the run's at the same time
        self._behaviour_tokenizer = copy.deepcopy(self.tokenizer)
        self._behaviour_engine = make_engine(self.obj.rollout, self._behaviour, self._behaviour_tokenizer,
                                             seed=self.obj.seed)
        self.behaviour_version = None
        if self.family.needs_sandbox:  # created here, once: not lazily by two threads at the same time
            _ = self.sandbox_backend

    def behaviour_player(self, checkpoint: str) -> Any:
        """A :class:`environments.start.SlotPlayer` sampling from the frozen behaviour copy loaded
        with ``checkpoint``'s policy weights (never the live policy the update mutates)."""
        if self._behaviour is None:
            raise RuntimeError("prepare_behaviour() must run before the rollout lane samples")
        if self.behaviour_version != checkpoint:
            load_checkpoint(Path(checkpoint), self._behaviour, None)
            self.behaviour_version = checkpoint
        return self._player(self._behaviour_engine, self._behaviour_tokenizer)

    @property
    def sandbox_backend(self) -> Any:
        """The sandbox backend of this run (created on first use, for families that need one)."""
        if self._sandbox_backend is None:
            from environments.sandbox import make_backend

            self._sandbox_backend = make_backend(self.obj.sandbox, base_dir=str(self.paths.root / "sandboxes"))
        return self._sandbox_backend

    @property
    def player(self) -> Any:
        """A :class:`environments.start.SlotPlayer` on this run's live objects (policy built first); for a
        family whose episodes an outside program plays (``TaskFamily.external_agent``), a
        :class:`stages.rollout.lightning.AgentProgramPlayer`."""
        self.build_policy()
        return self._player(self.engine, self.tokenizer)

    def _player(self, engine: Any, tokenizer: Any) -> Any:
        from environments.start import SlotPlayer
        from stages.rollout.lightning import AgentProgramPlayer

        new_sandbox = (lambda: self.sandbox_backend.create()) if self.family.needs_sandbox else None
        # an outside agent program plays the episodes against the served policy (env=lightning)
        player = AgentProgramPlayer if self.family.external_agent else SlotPlayer
        return player(family=self.family, engine=engine, tokenizer=tokenizer, rollout=self.obj.rollout,
                          new_sandbox=new_sandbox)

    def reference_policy(self) -> torch.nn.Module:
        """The frozen initial policy: the trainer's KL reference if there is one, else the run's
        ``init`` checkpoint loaded into a copy of the policy (kept for the rest of the process)."""
        self.build_policy()
        if self.trainer.reference is not None:
            return self.trainer.reference
        if self._reference is None:
            import copy

            ref = copy.deepcopy(self.policy)
            load_checkpoint(self.paths.checkpoints / "init", ref, None)
            self._reference = ref.eval().requires_grad_(False)
        return self._reference

    def judge(self) -> Any:
        """The LLM judge the credit method's config names (loaded once per process)."""
        if self._judge is None:
            from stages.reward.judge import make_judge

            self._judge = make_judge(self.method.cfg, policy=self.policy, tokenizer=self.tokenizer)
        return self._judge

    def close(self) -> None:
        """Release live resources (sandboxes); the run directory stays."""
        if self._sandbox_backend is not None:
            self._sandbox_backend.close()
            self._sandbox_backend = None

    def seed_for(self, iteration: int, stage: str) -> int:
        import zlib

        return zlib.crc32(f"{self.obj.seed}:{iteration}:{stage}".encode()) & 0x7FFFFFFF


class InjectedCrash(RuntimeError):
    """Raised by ``debug.crash_at`` (tests of resume)."""
