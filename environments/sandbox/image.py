"""Offline build of the docker sandbox image from the host (survey §8.2: environment construction).

No registry is needed: the image's root filesystem is assembled from files already on this
machine and loaded with ``docker import``. It holds

* the host's ``python3`` interpreter (``/usr/bin/python3`` when present, else the interpreter
  running this code), every shared library ``ldd`` lists for it and for its extension modules
  (``lib-dynload``), and its standard library without ``test/``, ``idlelib``, ``tkinter``,
  ``lib2to3``, ``ensurepip``, ``site-packages``/``dist-packages`` and the host's ``__pycache__``;
  instead its bytecode is compiled at build time by that interpreter into ``__pycache__`` as
  *unchecked-hash* pycs (PEP 552: valid whatever the files' mtimes, which the tar sets to 0; the
  image never changes). The root filesystem is read-only in a sandbox and Python runs with
  ``PYTHONDONTWRITEBYTECODE=1``: without them every exec compiled what it imported in memory
  (``import ast, json, copy``: ~100 ms instead of ~25 ms here, most of a code-family test run);
* ``/bin/sh`` and the few coreutils the backend and typical environments need (or the host's
  ``busybox`` with one link per applet, when present), with their shared libraries;
* ``/etc/passwd`` and ``/etc/group`` with the unprivileged ``sandbox`` user (uid/gid 1000) that
  runs every exec, and the empty mount points ``/work`` (the writable work dir), ``/tmp``,
  ``/proc``, ``/sys``, ``/dev``.

Files keep their absolute host paths (``/lib``, ``/bin``, ``/sbin``, ``/lib64`` are folded into
``/usr`` with top-level symlinks, as on merged-``/usr`` distributions), so the interpreter finds its
prefix as it does on the host. The tar is deterministic (mtime 0, owner root).

Idempotent: the image carries the label ``creditflow.content_hash``, a hash of the manifest
(archive path, source path, size, mtime and mode of every file, plus the builder version);
``build_image`` returns at once when an image with that hash exists (and re-tags it). ``force``
rebuilds regardless. The CLI entry point is :func:`main` (``creditflow sandbox build-image``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any, Iterable, Optional, Sequence

log = logging.getLogger("creditflow.sandbox")

#: tag of the image the docker backend uses when ``sandbox.image`` is empty
DEFAULT_TAG = "creditflow/sandbox:latest"
#: bump when the layout of the image changes (part of the content hash)
BUILDER_VERSION = "3"
#: uid/gid of the unprivileged user every exec runs as
SANDBOX_UID = 1000
#: labels put on everything this project creates in the Docker engine
MANAGED_LABEL = "creditflow.managed"

#: the programs the backend and typical environments need (found on PATH; missing ones skipped)
TOOLS = (
    "sh", "cat", "sleep", "ls", "mkdir", "rm", "cp", "mv", "ln", "touch", "chmod", "dd", "head",
    "tail", "seq", "env", "id", "kill", "timeout", "true", "false", "wc", "tr", "sort", "tee",
    "mkfifo", "setsid", "printf", "echo", "test", "uname", "pwd", "yes", "stat", "du", "find",
    "grep", "sed", "cut", "basename", "dirname", "date", "diff", "xargs", "tar", "realpath",
)
#: stdlib directories left out (tests, GUI, packaging, third-party packages, bytecode caches)
SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
             "site-packages", "dist-packages", "__pycache__", "config-3.11-x86_64-linux-gnu"}
#: extension modules left out (CPython's own test modules and GUI bindings)
SKIP_EXT = re.compile(r"^(_test|xx|_xx|_ctypes_test|_tkinter)")

_USR_FOLD = ("/lib/", "/bin/", "/sbin/", "/lib64/", "/lib32/", "/libx32/")


# ----------------------------------------------------------------------------- host discovery


def _fold(path: str) -> str:
    """Image path of a host path (``/lib/x`` -> ``usr/lib/x``), relative, without leading slash."""
    for p in _USR_FOLD:
        if path.startswith(p):
            path = "/usr" + path
            break
    return path.lstrip("/")


def _ldd(path: str) -> list[str]:
    """Absolute paths of the shared libraries ``path`` needs (ELF only; [] for scripts)."""
    try:
        r = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    libs = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
        else:
            target = line.split("(")[0].strip()
        if target.startswith("/"):
            libs.append(target)
    return libs


def default_python() -> str:
    """The host interpreter to put into the image."""
    if os.path.exists("/usr/bin/python3"):
        return "/usr/bin/python3"
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def _python_layout(python: str) -> dict[str, str]:
    code = (
        "import sys, sysconfig, os; p = sysconfig.get_paths(); "
        "print(os.path.realpath(sys.executable)); print(p['stdlib']); print(p['platstdlib']); "
        "print('%d.%d' % sys.version_info[:2])"
    )
    out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    exe, stdlib, platstdlib, version = out.split("\n")[:4]
    return {"exe": exe, "stdlib": stdlib, "platstdlib": platstdlib, "version": version}


def _walk_stdlib(root: str) -> Iterable[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo", ".exe")) or name in ("EXTERNALLY-MANAGED",):
                continue
            if os.path.basename(dirpath) == "lib-dynload" and SKIP_EXT.match(name):
                continue
            yield os.path.join(dirpath, name)


def collect(python: Optional[str] = None) -> tuple[dict[str, str], dict[str, str]]:
    """The image's files: ``({image path: host path}, {image path: symlink target})``."""
    python = python or default_python()
    lay = _python_layout(python)
    files: dict[str, str] = {}
    links: dict[str, str] = {}

    def add(host: str, image: Optional[str] = None) -> None:
        real = os.path.realpath(host)
        if not os.path.isfile(real):
            return
        files[image or _fold(host)] = real

    # interpreter, its stdlib and the libraries of both
    add(lay["exe"])
    elf = [lay["exe"]]
    for root in dict.fromkeys([lay["stdlib"], lay["platstdlib"]]):
        for f in _walk_stdlib(root):
            add(f)
            if f.endswith(".so"):
                elf.append(f)
    exe_img = "/" + _fold(lay["exe"])
    for alias in ("usr/bin/python3", f"usr/bin/python{lay['version']}", "usr/bin/python"):
        if alias != exe_img.lstrip("/"):
            links[alias] = exe_img
    # shell and tools: busybox when the host has it, else the individual programs
    busybox = shutil.which("busybox")
    if busybox:
        add(busybox, "usr/bin/busybox")
        elf.append(busybox)
        for tool in TOOLS:
            links.setdefault(f"usr/bin/{tool}", "/usr/bin/busybox")
    else:
        for tool in TOOLS:
            path = shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin")
            if path:
                add(path, f"usr/bin/{tool}")
                elf.append(path)
    for exe in elf:
        for lib in _ldd(exe):
            add(lib)
    for d in ("lib", "bin", "sbin", "lib64"):
        links[d] = f"usr/{d}"
    return files, links


_COMPILE = r"""
import importlib.util, json, py_compile, sys
out = {}
for src, img, dest in json.load(sys.stdin):
    try:
        py_compile.compile(src, cfile=dest, dfile="/" + img, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    except (py_compile.PyCompileError, SyntaxError, ValueError, OSError):
        continue
    out[importlib.util.cache_from_source("/" + img).lstrip("/")] = dest
json.dump(out, sys.stdout)
"""


def compile_bytecode(files: dict[str, str], tmpdir: str, python: Optional[str] = None) -> dict[str, str]:
    """Compile the image's ``.py`` files with the image's interpreter into ``tmpdir``; returns
    ``{image path of the pyc: host path}`` (files that do not compile are left to run from source)."""
    python = python or default_python()
    jobs = [(host, img, os.path.join(tmpdir, f"{i}.pyc")) for i, (img, host) in enumerate(sorted(files.items()))
            if img.endswith(".py")]
    r = subprocess.run([python, "-I", "-c", _COMPILE], input=json.dumps(jobs), capture_output=True, text=True,
                       timeout=600, check=True)
    return json.loads(r.stdout)


def _etc_files() -> dict[str, bytes]:
    u = SANDBOX_UID
    return {
        "etc/passwd": f"root:x:0:0:root:/root:/bin/sh\nsandbox:x:{u}:{u}:sandbox:/work:/bin/sh\n".encode(),
        "etc/group": f"root:x:0:\nsandbox:x:{u}:\n".encode(),
        "etc/hosts": b"127.0.0.1 localhost\n",
    }


def content_hash(files: dict[str, str], links: dict[str, str]) -> str:
    h = hashlib.sha256(f"creditflow-sandbox-image v{BUILDER_VERSION}\n".encode())
    for img in sorted(files):
        st = os.stat(files[img])
        h.update(f"F {img} {files[img]} {st.st_size} {st.st_mtime_ns} {st.st_mode:o}\n".encode())
    for img in sorted(links):
        h.update(f"L {img} {links[img]}\n".encode())
    for name, data in sorted(_etc_files().items()):
        h.update(f"E {name} ".encode() + hashlib.sha256(data).digest())
    return h.hexdigest()


def write_rootfs_tar(files: dict[str, str], links: dict[str, str], out: Any) -> int:
    """Write the deterministic root filesystem tar to the binary file ``out``; returns its file count."""
    dirs: set[str] = {"work", "tmp", "proc", "sys", "dev", "etc", "root", "usr/bin", "usr/lib"}
    for p in list(files) + list(links) + list(_etc_files()):
        parent = os.path.dirname(p)
        while parent:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    dirs -= set(links)

    def info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = kind, mode, 0, 0, 0
        return ti

    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info(d, tarfile.DIRTYPE, mode))
        for img in sorted(links):
            ti = info(img, tarfile.SYMTYPE, 0o777)
            ti.linkname = links[img]
            tar.addfile(ti)
        for img in sorted(files):
            st = os.stat(files[img])
            ti = info(img, tarfile.REGTYPE, stat.S_IMODE(st.st_mode) & 0o755 | 0o444)
            ti.size = st.st_size
            with open(files[img], "rb") as f:
                tar.addfile(ti, f)
        for name, data in sorted(_etc_files().items()):
            ti = info(name, tarfile.REGTYPE, 0o644)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return len(files) + len(links)


# ----------------------------------------------------------------------------- build


def _client(client: Any = None) -> Any:
    if client is not None:
        return client
    import docker  # the SDK is only needed for the docker backend

    return docker.from_env(timeout=120)


def find_image(client: Any, chash: str) -> Optional[Any]:
    # snapshot images committed from sandboxes inherit the labels: match the kind as well
    imgs = client.images.list(filters={"label": [f"creditflow.content_hash={chash}", "creditflow.kind=sandbox-image"]})
    return imgs[0] if imgs else None


def build_image(
    tag: str = DEFAULT_TAG,
    force: bool = False,
    python: Optional[str] = None,
    client: Any = None,
) -> tuple[str, float]:
    """Build (or find) the sandbox image; returns ``(image id, seconds)``.

    The image id is the ``sha256:`` digest of the image config (``docker import`` images have no
    registry digest). Idempotent unless ``force``: an image with the same content hash is re-tagged
    and returned without rebuilding.
    """
    t0 = time.monotonic()
    client = _client(client)
    files, links = collect(python)
    chash = content_hash(files, links)
    repo, _, version = tag.rpartition(":") if ":" in tag.split("/")[-1] else (tag, "", "latest")
    if not force:
        found = find_image(client, chash)
        if found is not None:
            if tag not in found.tags:
                found.tag(repo, version)
            log.info("sandbox image %s up to date (%s)", tag, found.id[:19])
            return found.id, time.monotonic() - t0
    changes = [
        f"LABEL {MANAGED_LABEL}=1",
        f"LABEL creditflow.content_hash={chash}",
        "LABEL creditflow.kind=sandbox-image",
        f"LABEL creditflow.builder_version={BUILDER_VERSION}",
        f"USER {SANDBOX_UID}:{SANDBOX_UID}",
        "WORKDIR /work",
        "ENV PATH=/usr/local/bin:/usr/bin:/bin HOME=/work TMPDIR=/work LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1",
        'CMD ["/usr/bin/sleep", "infinity"]',
    ]
    with tempfile.NamedTemporaryFile(prefix="creditflow-rootfs-", suffix=".tar") as tmp, \
            tempfile.TemporaryDirectory(prefix="creditflow-pyc-") as pyc_dir:
        files = {**files, **compile_bytecode(files, pyc_dir, python)}
        n = write_rootfs_tar(files, links, tmp)
        tmp.flush()
        size = tmp.tell()
        out = client.api.import_image_from_file(tmp.name, repository=repo, tag=version, changes=changes)
    image = find_image(client, chash)
    if image is None:
        raise RuntimeError(f"docker import of the sandbox image did not produce an image: {out!r}")
    _remove_dangling(client)
    secs = time.monotonic() - t0
    log.info("built sandbox image %s (%s): %d entries, %.1f MiB tar, %.1f s", tag, image.id[:19], n, size / 2**20, secs)
    return image.id, secs


def _remove_dangling(client: Any) -> None:
    """Remove untagged older sandbox images (left by a rebuild); images still in use stay."""
    for img in client.api.images(filters={"label": "creditflow.kind=sandbox-image", "dangling": True}):
        try:
            client.api.remove_image(img["Id"])
        except Exception as exc:  # noqa: BLE001 - in use by a container
            log.debug("keeping old sandbox image %s: %s", img["Id"][:19], exc)


def ensure_image(client: Any, tag: str = DEFAULT_TAG) -> str:
    """The id of ``tag``; the default tag is (re)built first when missing or from an older builder.

    Cheap when the image is there (one inspect; the host files are not re-hashed: run
    ``creditflow sandbox build-image`` after upgrading the host's Python).
    """
    import docker

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        if tag != DEFAULT_TAG:
            raise
        image = None
    if image is not None:
        labels = image.labels or {}
        if tag != DEFAULT_TAG or (labels.get("creditflow.builder_version") == BUILDER_VERSION
                                  and labels.get("creditflow.kind") == "sandbox-image"):
            return image.id
    image_id, _ = build_image(tag, client=client)
    return image_id


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``creditflow sandbox build-image [--tag T] [--force] [--python PATH]``."""
    ap = argparse.ArgumentParser(prog="creditflow sandbox build-image", description=__doc__.split("\n")[0])
    ap.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default {DEFAULT_TAG})")
    ap.add_argument("--force", action="store_true", help="rebuild even when an identical image exists")
    ap.add_argument("--python", default=None, help="host interpreter to copy (default: /usr/bin/python3)")
    args = ap.parse_args(argv)
    try:
        image_id, secs = build_image(args.tag, force=args.force, python=args.python)
    except Exception as exc:  # noqa: BLE001 - CLI: one line, not a traceback
        print(f"build-image failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.tag} {image_id} ({secs:.1f} s)")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
