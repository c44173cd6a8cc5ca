"""Docker sandbox backend: pooled, locked-down containers (survey §8.2: reset cost, safety).

Survey §8.2 names the two costs of agentic environments this backend addresses: *environment
reset cost* (spinning up a container takes ~0.2 s here, which MC credit methods that re-run
episodes from intermediate turns pay again and again) and *safety during training* (rollouts
execute untrusted, policy-written code). Hence warm containers in a pool, a work-directory
snapshot that forks in one exec, and a container that can neither reach the network nor
write outside its work directory.

Container
---------
Created from ``cfg.image`` (default ``creditflow/sandbox:latest``, built offline from the host by
:mod:`environments.sandbox.image` on first use) with

* ``network_mode=none`` unless ``cfg.network`` (then the default bridge);
* read-only root filesystem; the only writable places are the work dir ``/work`` (a tmpfs of
  ``work_dir_mb``, owned by uid 1000, so filling the disk stops there with ``ENOSPC``) and a
  private ``/dev/shm`` of 16 MiB (wiped on reset). ``/tmp`` is read-only: ``TMPDIR=HOME=/work``;
* memory = swap limit ``memory_mb`` (the cgroup OOM killer ends the largest process), CPU quota
  ``cpus``, pids limit ``max_processes`` + 4 (init, the idle main process, the kill helper);
* ``cap_drop=ALL``, ``no-new-privileges``, ulimits ``core=0``, ``nofile=1024``,
  ``fsize=max_file_mb`` (``SIGXFSZ``) and ``cpu=cpu_seconds`` (``SIGXCPU``; per process);
* ``init=True`` (docker-init reaps orphans) running ``sleep infinity`` as root-without-capabilities.
  Every exec runs as the unprivileged uid 1000 in ``/work``. Because that uid owns nothing but
  the sandbox's own processes, ``kill -9 -1`` run as uid 1000 kills the whole process tree of an
  exec (``setsid``, double forks and daemons included) but never init; this is how every exec
  ends.

Exec
----
By default (``docker_exec="resident"``) each container keeps one long-lived exec, a small Python
executor that reads framed requests over that exec's hijacked socket and runs each command as
uid 1000 in ``/work`` in its own session, with the timeout, output caps and process-tree kill
below; file writes/reads and the reset of the work dir it does itself, without a fork
(:mod:`~environments.sandbox.docker_resident`: protocol, and why ``kill(-1)`` spares the executor).
That removes the engine round trips of ``docker exec`` (~50 ms a command here, ~3 ms resident).
When no executor can start, or ``docker_exec="exec"``, each command is one ``docker exec``
(:mod:`~environments.sandbox.docker_exec`): ``docker exec`` has no timeout, so the backend drives the
exec's raw hijacked socket itself (non-blocking, ``selectors``): stdin is fed concurrently and the
write side half-closed at its end; stdout/stderr frames are demultiplexed; each stream keeps at most
``max_output_bytes``. The command runs under a tiny ``sh`` wrapper that, when the command returns,
kills every remaining process of the sandbox (``kill -9 -1``) so background children never outlive
an exec. At the deadline, or when a stream passes 10x the cap, a second exec runs ``kill -9 -1``
(retried; a fork bomb that takes every pid is handled too) and the exec is abandoned. If even
that fails, the container is restarted: its processes *and its work dir* are gone (logged,
``stderr`` says so). A command that kills the resident executor itself (``kill -9 -1``) gets
``killed`` (or ``oom``), its output is lost, the kill helper ends what is left and the next exec
starts a new executor. Reasons are those of the process backend: ``timeout``, ``output_limit``,
then from the exit status ``cpu_limit`` (``SIGXCPU``), ``file_limit`` (``SIGXFSZ``), ``oom``
(``SIGKILL`` and the cgroup's ``oom_kill`` counter went up), ``killed`` (any other signal),
``output_limit`` (truncated but finished), ``error`` (could not start). Both paths report a
death by signal N the way the shell does (status 128+N), so an exit status 129..192 is read as
signal N and comes back as ``exit_code=-N``; a program that *exits* with such a status is
indistinguishable. A pids-limit hit is not detected as such (fork fails inside the sandbox and
the program usually ends at the timeout).

Modules: :mod:`~environments.sandbox.docker_engine` (engine access, labels, ``cleanup_stale``, exit
hooks), :mod:`~environments.sandbox.docker_exec` (the ``docker exec`` transport),
:mod:`~environments.sandbox.docker_resident` (the resident executor),
:mod:`~environments.sandbox.docker_sandbox` (``DockerSandbox``, ``DockerSnapshot``); this module:
``DockerBackend`` (containers, pool, snapshots) and the public names.

Snapshot and fork (why a tar, not ``docker commit``)
----------------------------------------------------
All mutable state of a sandbox lives in ``/work`` (the root filesystem is read-only), and
``docker commit`` does not capture tmpfs contents, nor can ``get_archive``/``put_archive`` see
or write them (the daemon reads the container's root filesystem, not its tmpfs; writes to a
read-only root are refused). So ``snapshot()`` streams ``tar -C /work -cf -`` out of the
container through an exec and keeps the bytes; ``fork()`` takes a warm container from the pool
and untars them (one exec, ~0.07 s). ``snapshot_mode="commit"`` is the path the issue asked
for, kept for comparison and for snapshots that must outlive the process: the tar is put into a
helper container created from the image, ``docker commit`` makes an image of it, and ``fork``
creates and starts a container from that image and copies the snapshot into ``/work``
(create + start + exec, ~0.35 s: it cannot use the pool). ``benchmarks/sandbox.py`` measures both.
Neither mode captures *processes* (CRIU checkpoints do not work here): a snapshot is the work
dir's files; servers started by an exec must be started again after a fork.

Pool, reset, cleanup
--------------------
``pool_size`` containers are kept warm in all, those in use included: a background thread tops
the idle ones up to ``pool_size`` minus the sandboxes in use, so set it to the number of
sandboxes used at once (more than that are created cold, ~0.2 s, and removed on close).
``create()`` hands out a warm container; ``Sandbox.close()`` resets it (one exec: kill all, wipe
``/work`` and ``/dev/shm``) and returns it to the pool, or removes it when the pool is full or
the container is unhealthy (a container forked from a committed snapshot image is never pooled). ``reset()``
is the same exec plus, for forks, the untar of the origin snapshot.
Everything the backend creates carries the labels ``creditflow.managed=1``,
``creditflow.owner_pid``, ``creditflow.owner_start`` (the owner's start time, against pid
reuse), ``creditflow.owner_host`` and ``creditflow.session``. ``backend.close()`` removes its
containers and snapshot images; an ``atexit`` hook and a chained ``SIGTERM`` handler (installed
when the backend is created in the main thread) close every live backend; :func:`cleanup_stale`,
run when a backend starts, removes labelled containers and images whose owner process on this
host is dead (a crash, ``kill -9``).
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
import threading
import time
import uuid
from typing import Any, Optional

from environments.sandbox.base import SandboxBackend, SandboxConfig, SandboxUnavailable
from environments.sandbox.docker_engine import (  # noqa: F401 - public names of this module
    _LIVE, _docker_client, _hostname, _install_exit_hooks, _proc_start, check_docker, cleanup_stale,
    docker_reachable,
)
from environments.sandbox.docker_exec import _ENV, _MIB, _PIDS_HEADROOM, _SNAP_DIR, _USER, _WORK
from environments.sandbox.docker_resident import Resident
from environments.sandbox.docker_sandbox import DockerSandbox, DockerSnapshot
from environments.sandbox.image import DEFAULT_TAG, MANAGED_LABEL, SANDBOX_UID, ensure_image

__all__ = ["DockerBackend", "DockerSandbox", "DockerSnapshot", "check_docker", "cleanup_stale", "docker_reachable"]

log = logging.getLogger("creditflow.sandbox")


# ----------------------------------------------------------------------------- backend


class DockerBackend(SandboxBackend):
    """Pooled docker sandboxes; see the module docstring.

    ``base_dir`` is accepted for signature compatibility with the process backend and unused
    (all state lives in the Docker engine). ``client``: a ``docker.DockerClient`` to use.
    """

    name = "docker"

    def __init__(self, cfg: Optional[SandboxConfig] = None, base_dir: Optional[str] = None, client: Any = None):
        self.cfg = cfg if cfg is not None else SandboxConfig()
        if self.cfg.snapshot_mode not in ("archive", "commit"):
            raise ValueError(f"sandbox.snapshot_mode must be archive or commit, got {self.cfg.snapshot_mode!r}")
        if self.cfg.docker_exec not in ("resident", "exec"):
            raise ValueError(f"sandbox.docker_exec must be resident or exec, got {self.cfg.docker_exec!r}")
        self.chosen = self.name
        self.client = client if client is not None else _docker_client()
        self.api = self.client.api
        self.session = uuid.uuid4().hex[:12]
        self.labels = {
            MANAGED_LABEL: "1",
            "creditflow.owner_pid": str(os.getpid()),
            "creditflow.owner_start": _proc_start(os.getpid()),
            "creditflow.owner_host": _hostname(),
            "creditflow.session": self.session,
        }
        self._lock = threading.Lock()
        self._closed = False
        self._containers: set[str] = set()  # every container of this backend (pooled, in use, starting)
        self._idle: list[str] = []
        self._sandboxes: dict[str, DockerSandbox] = {}
        self._snapshots: dict[str, DockerSnapshot] = {}
        self._stale_images: set[str] = set()  # snapshot images whose removal must be retried at close
        self._residents: dict[str, Resident] = {}  # container id -> its resident executor
        self._oom_counts: dict[str, int] = {}  # pooled container id -> its oom_kill counter when released
        self._resident_retry: dict[str, float] = {}  # container id -> when to try starting one again
        _LIVE.add(self)
        _install_exit_hooks()
        try:
            cleanup_stale(self.client)
        except Exception as exc:  # noqa: BLE001 - never block a run on housekeeping
            log.warning("sandbox cleanup_stale failed: %s", exc)
        self.image = self.cfg.image or DEFAULT_TAG
        try:
            self.image_id = ensure_image(self.client, self.image)
        except Exception as exc:  # noqa: BLE001
            if self.cfg.image:
                try:
                    self.image_id = self.client.images.pull(self.image).id
                except Exception as exc2:  # noqa: BLE001
                    raise SandboxUnavailable(
                        f"sandbox image {self.image!r} is not available locally and cannot be pulled ({exc2}); "
                        "fix: load or build it, or leave sandbox.image empty for the offline default"
                    ) from None
            else:
                raise SandboxUnavailable(f"cannot build the default sandbox image offline ({exc}); "
                                         "see infra/sandbox/README.md") from None
        attrs = self.client.images.get(self.image_id).attrs
        #: what to record in the run's MLflow tags: the registry digest when there is one, else the image id
        self.image_digest = (attrs.get("RepoDigests") or [self.image_id])[0]
        self._wakeup = threading.Event()
        self._refiller = threading.Thread(target=self._refill_loop, name="creditflow-sandbox-pool", daemon=True)
        self._refiller.start()
        if self.cfg.pool_size > 0:
            self._wakeup.set()

    # -- containers ----------------------------------------------------------------------

    def _host_config(self) -> Any:
        from docker.types import Ulimit

        cfg = self.cfg
        ulimits = [Ulimit(name="core", soft=0, hard=0), Ulimit(name="nofile", soft=1024, hard=1024)]
        if cfg.max_file_mb and cfg.max_file_mb > 0:
            ulimits.append(Ulimit(name="fsize", soft=cfg.max_file_mb * _MIB, hard=cfg.max_file_mb * _MIB))
        if cfg.cpu_seconds and cfg.cpu_seconds > 0:
            ulimits.append(Ulimit(name="cpu", soft=int(cfg.cpu_seconds), hard=int(cfg.cpu_seconds) + 1))
        kw: dict[str, Any] = dict(
            network_mode="bridge" if cfg.network else "none",
            read_only=True,
            tmpfs={_WORK: f"rw,exec,nosuid,nodev,size={int(cfg.work_dir_mb)}m,uid={SANDBOX_UID},gid={SANDBOX_UID},mode=0755"},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            ulimits=ulimits,
            init=True,
            ipc_mode="private",
            shm_size="16m",
        )
        if cfg.memory_mb and cfg.memory_mb > 0:
            kw.update(mem_limit=f"{int(cfg.memory_mb)}m", memswap_limit=f"{int(cfg.memory_mb)}m")
        if cfg.max_processes and cfg.max_processes > 0:
            kw["pids_limit"] = int(cfg.max_processes) + _PIDS_HEADROOM
        if cfg.cpus and cfg.cpus > 0:
            kw["nano_cpus"] = int(float(cfg.cpus) * 1e9)
        return self.api.create_host_config(**kw)

    def _start_container(self, image: Optional[str] = None, kind: str = "sandbox") -> str:
        c = self.api.create_container(
            image or self.image_id,
            command=["sleep", "infinity"],
            user="0:0",
            working_dir=_WORK,
            environment=_ENV,
            labels={**self.labels, "creditflow.kind": kind},
            host_config=self._host_config(),
        )
        cid = c["Id"]
        with self._lock:
            self._containers.add(cid)
            closed = self._closed
        if closed:
            self._remove_container(cid)
            raise RuntimeError("docker sandbox backend is closed")
        try:
            self.api.start(cid)
        except Exception:
            self._remove_container(cid)
            raise
        return cid

    def _resident(self, cid: str, wait: bool = False) -> Optional[Resident]:
        """The container's resident executor, started when missing; None for ``docker_exec="exec"``
        or while one cannot start (retried after a second)."""
        if self.cfg.docker_exec != "resident":
            return None
        with self._lock:
            r = self._residents.get(cid)
            if r is not None and r.alive:
                return r
            if self._closed or time.monotonic() < self._resident_retry.get(cid, 0.0):
                return None
        try:
            r = Resident(self.api, cid, _USER, _WORK, _ENV)
            if wait and not r.wait_ready():
                raise RuntimeError("no hello from the executor")
        except Exception as exc:  # noqa: BLE001 - pids exhausted, container gone: docker exec instead
            log.debug("sandbox %s: cannot start the resident executor: %s", cid[:12], exc)
            with self._lock:
                self._resident_retry[cid] = time.monotonic() + 1.0
            return None
        with self._lock:
            self._residents[cid] = r
        return r

    def _drop_resident(self, cid: str) -> None:
        with self._lock:
            r = self._residents.pop(cid, None)
        if r is not None:
            r.close()

    def _remove_container(self, cid: str) -> None:
        self._drop_resident(cid)
        with self._lock:
            self._oom_counts.pop(cid, None)
        try:
            self.api.remove_container(cid, force=True, v=True)
        except Exception as exc:  # noqa: BLE001 - already gone
            if "No such container" not in str(exc) and "already in progress" not in str(exc):
                log.warning("removing sandbox container %s: %s", cid[:12], exc)
        with self._lock:
            self._containers.discard(cid)

    def _refill_loop(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            while True:
                with self._lock:
                    if self._closed or len(self._idle) >= self._pool_target():
                        break
                try:
                    cid = self._start_container()
                except Exception as exc:  # noqa: BLE001
                    if not self._closed:
                        log.warning("sandbox pool refill failed: %s", exc)
                    break
                self._resident(cid, wait=True)  # warm: the executor is up before the container is handed out
                with self._lock:
                    self._idle.append(cid)
            if self._closed:
                return

    def _pool_target(self) -> int:
        """Idle containers to keep: ``pool_size`` warm containers in all, counting those in use."""
        return max(int(self.cfg.pool_size) - len(self._sandboxes), 0)

    def _take(self) -> str:
        with self._lock:
            self._check_open()
            cid = self._idle.pop() if self._idle else None
        if cid is None:
            cid = self._start_container()
        return cid

    def _register(self, sb: DockerSandbox) -> DockerSandbox:
        with self._lock:
            self._sandboxes[sb.id] = sb
        self._wakeup.set()  # top the pool up in the background
        return sb

    def _release(self, sb: DockerSandbox) -> None:
        """A closed sandbox's container: reset and back to the pool, or removed."""
        with self._lock:
            self._sandboxes.pop(sb.id, None)
            self._oom_counts[sb.container_id] = sb._oom_seen
            keep = not self._closed and sb._healthy and len(self._idle) < self._pool_target()
        if keep:
            try:
                sb._ensure_running()
                sb._wipe("empty")
            except Exception as exc:  # noqa: BLE001
                log.debug("sandbox %s: not returned to the pool: %s", sb.id, exc)
                keep = False
        if keep and sb.origin is not None and sb.origin.mode == "commit":
            keep = False  # a container of a snapshot image holds that snapshot; not a clean pool member
        if keep:
            with self._lock:
                if not self._closed:
                    self._idle.append(sb.container_id)
                    return
        self._remove_container(sb.container_id)

    def _has_snapshot(self, snap: DockerSnapshot) -> bool:
        with self._lock:
            return snap.id in self._snapshots

    def _snapshot(self, sb: DockerSandbox) -> DockerSnapshot:
        self._check_open()
        data = sb._tar_workdir()
        sid = uuid.uuid4().hex[:12]
        if self.cfg.snapshot_mode == "archive":
            snap = DockerSnapshot(sid, sb.id, time.time(), "archive", len(data), data=data)
        else:
            snap = DockerSnapshot(sid, sb.id, time.time(), "commit", len(data), image_id=self._commit(data, sid))
        with self._lock:
            self._snapshots[sid] = snap
        return snap

    def _commit(self, work_tar: bytes, sid: str) -> str:
        """Commit an image = the sandbox image + the work dir's files under /creditflow-snapshot."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(work_tar)) as src, tarfile.open(fileobj=buf, mode="w") as dst:
            root = tarfile.TarInfo(_SNAP_DIR.lstrip("/"))
            root.type, root.mode, root.uid, root.gid = tarfile.DIRTYPE, 0o755, SANDBOX_UID, SANDBOX_UID
            dst.addfile(root)
            for m in src.getmembers():
                name = os.path.normpath(m.name)
                if name == ".":
                    continue
                m.name = f"{_SNAP_DIR.lstrip('/')}/{name}"
                dst.addfile(m, src.extractfile(m) if m.isreg() else None)
        helper = self.api.create_container(
            self.image_id, command=["sleep", "infinity"], labels={**self.labels, "creditflow.kind": "snapshot-helper"}
        )["Id"]
        with self._lock:
            self._containers.add(helper)
        try:
            self.api.put_archive(helper, "/", buf.getvalue())
            image_id = self.api.commit(
                helper, repository="creditflow/sandbox-snapshot", tag=sid,
                conf={"Labels": {**self.labels, "creditflow.kind": "snapshot"}, "User": "0:0"},
            )["Id"]
        finally:
            self._remove_container(helper)
        return image_id

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("docker sandbox backend is closed")

    # -- SandboxBackend API ---------------------------------------------------------------

    def create(self) -> DockerSandbox:
        return self._register(DockerSandbox(self, self._take()))

    def fork(self, snapshot: Any) -> DockerSandbox:
        self._check_open()
        if not isinstance(snapshot, DockerSnapshot):
            raise TypeError(f"fork needs a DockerSnapshot, got {type(snapshot).__name__}")
        if not self._has_snapshot(snapshot):
            raise ValueError(f"snapshot {snapshot.id} does not belong to this backend or was dropped")
        if snapshot.mode == "commit":
            cid = self._start_container(snapshot.image_id, kind="sandbox")
            sb = DockerSandbox(self, cid, origin=snapshot)
            try:
                sb._wipe("copy")
            except Exception:
                self._remove_container(cid)
                raise
            return self._register(sb)
        sb = DockerSandbox(self, self._take(), origin=snapshot)
        try:
            sb._wipe("untar", snapshot.data)
        except Exception:
            self._remove_container(sb.container_id)
            raise
        return self._register(sb)

    def drop_snapshot(self, snapshot: DockerSnapshot) -> None:
        """Forget a snapshot (and remove its image); sandboxes forked from it can no longer ``reset``."""
        with self._lock:
            self._snapshots.pop(snapshot.id, None)
        if snapshot.image_id:
            try:
                self.api.remove_image(snapshot.image_id, force=True)
            except Exception as exc:  # noqa: BLE001 - still used by a forked container: retried at close
                log.debug("removing snapshot image %s: %s", snapshot.image_id[:19], exc)
                with self._lock:
                    self._stale_images.add(snapshot.image_id)

    @property
    def sandboxes(self) -> list[DockerSandbox]:
        with self._lock:
            return list(self._sandboxes.values())

    @property
    def containers(self) -> list[str]:
        """Ids of every container this backend holds (in use, pooled, starting)."""
        with self._lock:
            return list(self._containers)

    def warm(self, n: Optional[int] = None, timeout_s: float = 60.0) -> int:
        """Wait until ``n`` containers (default: as many as the pool should hold now) are idle; returns how many are."""
        self._wakeup.set()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._lock:
                want = self._pool_target() if n is None else min(n, self._pool_target())
                if len(self._idle) >= want or self._closed:
                    return len(self._idle)
            time.sleep(0.02)
        with self._lock:
            return len(self._idle)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sandboxes = list(self._sandboxes.values())
            self._sandboxes.clear()
            self._idle.clear()
            snaps = list(self._snapshots.values())
            self._snapshots.clear()
        self._wakeup.set()
        for sb in sandboxes:
            sb._closed = True
        self._refiller.join(timeout=30)
        with self._lock:
            cids = list(self._containers)
        # in parallel (the engine does the work); plain threads: executors refuse to start at exit
        workers = [threading.Thread(target=self._remove_container, args=(c,), daemon=True) for c in cids]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        for snap in snaps:
            self.drop_snapshot(snap)
        for image_id in list(self._stale_images):
            try:
                self.api.remove_image(image_id, force=True)
            except Exception as exc:  # noqa: BLE001
                if "No such image" not in str(exc):
                    log.warning("removing snapshot image %s: %s", image_id[:19], exc)
        self._stale_images.clear()
        _LIVE.discard(self)

    def __enter__(self) -> "DockerBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
