"""Sandbox latencies, docker vs process (survey §8.2: environment reset cost).

Median of N of: create (pooled for docker: the pool is warmed first), exec (``echo``), exec of
python (``python3 -c pass``), reset, fork (from a snapshot of a small work dir; docker in both
snapshot modes, ``archive`` and ``commit``), teardown (``Sandbox.close``; docker: reset + return to
the pool), and episodes/s of a small scripted episode (create, write a file, exec python on it,
read the result, close), and code episodes/s: episodes of the ``code`` task family (create, write
the harness and the task, run the hidden tests on the reference body, close; what a rollout of
``env=code`` does per episode). Docker runs twice in the same process: commands through the
resident executor (``sandbox.docker_exec=resident``, the default) and one ``docker exec`` per
command (``docker_exec=exec``). Printed side by side with resident/process and exec/resident ratios.

    .venv/bin/python benchmarks/sandbox.py [--n 15] [--episodes 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from environments.sandbox import ProcessBackend, SandboxConfig  # noqa: E402

SCRIPT = b"import sys\nprint(sum(int(x) for x in open('in.txt').read().split()))\n"


def _median(fn: Callable[[], Any], n: int, setup: Optional[Callable[[], Any]] = None) -> float:
    times = []
    for _ in range(n):
        arg = setup() if setup else None
        t0 = time.perf_counter()
        fn() if arg is None else fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def episode(backend: Any) -> None:
    sb = backend.create()
    sb.write_file("in.txt", b"1 2 3 4")
    sb.write_file("prog.py", SCRIPT)
    r = sb.exec(["python3", "prog.py"])
    assert r.ok and r.stdout == b"10\n", r
    assert sb.read_file("in.txt") == b"1 2 3 4"
    sb.close()


def code_episodes_per_s(backend: Any, episodes: int) -> float:
    """Episodes/s of the code family, solved by the reference body (every episode must succeed)."""
    from environments.tasks.code import CodeFamily

    fam = CodeFamily()
    insts = [fam.instance("train", i, seed=0) for i in range(episodes)]
    getattr(backend, "warm", lambda *a, **k: None)()
    t0 = time.perf_counter()
    for inst in insts:
        sb = backend.create()
        env = fam.make(inst, sb)
        env.reset()
        r = env.step(inst.spec["reference_body"] + "\n")
        assert r.success, r
        env.close()
        sb.close()
    return episodes / (time.perf_counter() - t0)


def measure(backend: Any, n: int, episodes: int, fork_backend: Any = None) -> dict[str, float]:
    out: dict[str, float] = {}
    if hasattr(backend, "warm"):
        backend.warm()
    wait = getattr(backend, "warm", lambda *a, **k: None)

    def timed_create() -> float:
        wait()  # refill the pool between samples: we measure a warm create, not the refill
        t0 = time.perf_counter()
        s = backend.create()
        dt = time.perf_counter() - t0
        s.close()
        return dt

    out["create"] = statistics.median(timed_create() for _ in range(n))
    wait()
    sb = backend.create()
    out["exec echo"] = _median(lambda: sb.exec(["echo", "hi"]), n)
    out["exec python"] = _median(lambda: sb.exec(["python3", "-c", "pass"]), n)
    out["write+read file"] = _median(lambda: (sb.write_file("f.txt", b"x" * 1000), sb.read_file("f.txt")), n)

    def dirty(s: Any = sb) -> None:
        s.write_file("junk/a.txt", b"1" * 1000)

    out["reset"] = _median(lambda _: sb.reset(), n, setup=lambda: dirty() or 1)
    sb.write_file("state.txt", b"v1")
    sb.write_file("d/data.bin", os.urandom(100_000))
    forks = [(backend, "fork")] + ([(fork_backend, "fork (commit)")] if fork_backend is not None else [])
    for fb, label in forks:
        src = sb if fb is backend else fb.create()
        if src is not sb:
            src.write_file("state.txt", b"v1")
            src.write_file("d/data.bin", os.urandom(100_000))
        out["snapshot" if fb is backend else "snapshot (commit)"] = _median(lambda: fb.drop_snapshot(src.snapshot()), max(3, n // 3))
        snap = src.snapshot()
        def timed_fork() -> float:
            if fb is backend:
                wait()  # a warm container for the fork, as in steady state
            t0 = time.perf_counter()
            child = fb.fork(snap)
            dt = time.perf_counter() - t0
            assert child.read_file("state.txt") == b"v1"
            child.close()
            return dt

        out[label] = statistics.median(timed_fork() for _ in range(max(3, n // 3) if fb is fork_backend else n))
        fb.drop_snapshot(snap)
    def timed_close() -> float:
        wait()
        s = backend.create()
        s.write_file("junk.txt", b"1" * 1000)
        t0 = time.perf_counter()
        s.close()
        return time.perf_counter() - t0

    out["teardown"] = statistics.median(timed_close() for _ in range(n))
    sb.close()
    wait()
    t0 = time.perf_counter()
    for _ in range(episodes):
        episode(backend)
    out["episodes/s"] = episodes / (time.perf_counter() - t0)
    out["code episodes/s"] = code_episodes_per_s(backend, episodes)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=15, help="samples per latency (median)")
    ap.add_argument("--episodes", type=int, default=20, help="scripted episodes for episodes/s")
    ap.add_argument("--pool-size", type=int, default=4, help="docker pool size")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)

    cfg = SandboxConfig(pool_size=args.pool_size)
    with tempfile.TemporaryDirectory() as tmp, ProcessBackend(cfg, base_dir=tmp) as pb:
        proc = measure(pb, args.n, args.episodes)
    dock: dict[str, Any] = {}
    old: dict[str, Any] = {}
    why = ""
    try:
        from environments.sandbox.docker import DockerBackend

        db = DockerBackend(SandboxConfig(backend="docker", pool_size=args.pool_size))
        cb = DockerBackend(SandboxConfig(backend="docker", pool_size=0, snapshot_mode="commit"))
        try:
            dock = measure(db, args.n, args.episodes, fork_backend=cb)
            dock["image"] = db.image_digest
        finally:
            cb.close()
            db.close()
        with DockerBackend(SandboxConfig(backend="docker", pool_size=args.pool_size, docker_exec="exec")) as eb:
            old = measure(eb, args.n, args.episodes)
    except Exception as exc:  # noqa: BLE001 - no engine: print the process column only
        why = f"{type(exc).__name__}: {exc}"

    def cell(v: Any) -> str:
        return f"{v:12.4f}" if isinstance(v, float) else f"{'-':>12}"

    def ratio(a: Any, b: Any) -> str:
        return f"{a / b:13.1f}x" if isinstance(a, float) and isinstance(b, float) and b else f"{'-':>14}"

    print(f"sandbox latencies, median of {args.n} (seconds; episodes/s higher is better)  [survey §8.2]")
    print(f"{'operation':<20}{'process':>12}{'resident':>12}{'docker exec':>12}{'resident/proc':>14}{'exec/resident':>14}")
    for key in list(proc) + [k for k in dock if k not in proc and k != "image"]:
        p, d, e = proc.get(key), dock.get(key), old.get(key)
        print(f"{key:<20}{cell(p)}{cell(d)}{cell(e)}{ratio(d, p)}{ratio(e, d)}")
    if why:
        print(f"docker columns empty: {why}")
    else:
        print(f"docker image: {dock.get('image')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"process": proc, "docker": dock, "docker_exec": old, "docker_unavailable": why}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
