"""Atomic checkpoints: safetensors weights + optimizer state, written write-fsync-rename.

A checkpoint is a directory ``<root>/<name>/`` holding ``policy.safetensors``, optionally
``critic.safetensors``, ``helper.<name>.safetensors`` for each trained helper of the credit method
(:meth:`stages.credit.base.CreditMethod.helper_modules`, e.g. SPA-RL's progress estimator), ``optim.pt`` and ``manifest.json`` (sha256 and size of every file). It is
first written under a temporary name in the same parent, every file fsync'ed, the directory
renamed into place and the parent fsync'ed, so a reader sees either the whole checkpoint or none.
``load_checkpoint`` verifies the manifest, so a truncated or corrupt file is detected.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or fails its sha256 manifest; ``path`` names it."""

    def __init__(self, message: str, path: Optional[Path] = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None

    def __reduce__(self):  # keep ``path`` when Prefect pickles the exception
        return (type(self), (str(self), self.path))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_for_safetensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # tied weights share storage; safetensors refuses shared tensors, so clone each one
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(
    root: Path,
    name: str,
    policy: torch.nn.Module,
    critic: Optional[torch.nn.Module] = None,
    optim_state: Optional[dict[str, Any]] = None,
    meta: Optional[dict[str, Any]] = None,
    before_rename: Optional[Any] = None,
    helpers: Optional[dict[str, torch.nn.Module]] = None,
) -> Path:
    """Write checkpoint ``root/name`` atomically and return its path.

    ``before_rename`` (tests of crash safety) is called when every file is written and synced
    but the directory is not yet renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        files = {"policy.safetensors": lambda p: save_file(_state_for_safetensors(policy), str(p))}
        if critic is not None:
            files["critic.safetensors"] = lambda p: save_file(_state_for_safetensors(critic), str(p))
        for hname, module in (helpers or {}).items():
            files[f"helper.{hname}.safetensors"] = lambda p, m=module: save_file(_state_for_safetensors(m), str(p))
        if optim_state is not None:
            files["optim.pt"] = lambda p: torch.save(optim_state, p)
        manifest: dict[str, Any] = {"name": name, "meta": meta or {}, "files": {}}
        for fname, writer in files.items():
            path = tmp / fname
            try:
                writer(path)
                _fsync_file(path)
            except Exception as exc:
                # safetensors reports I/O errors as SafetensorError; say what failed, keep the errno
                err = getattr(exc, "errno", None) or (errno.ENOSPC if "os error 28" in str(exc) else None)
                if err is None:
                    raise
                raise OSError(err, f"{os.strerror(err)}: cannot write checkpoint {final} ({fname}): {exc}") from exc
            manifest["files"][fname] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if before_rename is not None:
            before_rename()
        if final.exists():
            # a re-run of an interrupted stage; the new, complete checkpoint replaces the old one
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Return the manifest; raise :class:`CheckpointError` (naming the file, and for a content
    mismatch the expected and actual sha256 / size) if anything is missing or corrupt."""
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST}", path)
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: corrupt {mf}: {exc}", path) from None
    for fname, info in files.items():
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint {path}: missing {fpath}", path)
        size = fpath.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {fpath} is truncated or corrupt: {size} bytes, the manifest says "
                f"{info['bytes']} (sha256 mismatch: expected {info['sha256']})", path)
        actual = _sha256(fpath)
        if actual != info["sha256"]:
            raise CheckpointError(
                f"checkpoint {path}: {fpath} is truncated or corrupt: sha256 mismatch (expected {info['sha256']}, "
                f"got {actual})", path)
    return manifest


def load_checkpoint(
    path: Path,
    policy: torch.nn.Module,
    critic: Optional[torch.nn.Module] = None,
    helpers: Optional[dict[str, torch.nn.Module]] = None,
) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Load weights into ``policy`` (and ``critic``, and each of ``helpers``) after verifying;
    return (manifest, optim state)."""
    manifest = verify_checkpoint(path)
    device = next(policy.parameters()).device
    policy.load_state_dict(load_file(str(path / "policy.safetensors"), device=str(device)), strict=True)
    if hasattr(policy, "tie_weights"):
        policy.tie_weights()
    if critic is not None:
        if "critic.safetensors" not in manifest["files"]:
            raise CheckpointError(f"checkpoint {path} has no critic weights but the credit method needs a critic", path)
        critic.load_state_dict(load_file(str(path / "critic.safetensors"), device=str(device)), strict=True)
    for hname, module in (helpers or {}).items():
        fname = f"helper.{hname}.safetensors"
        if fname not in manifest["files"]:
            raise CheckpointError(f"checkpoint {path} has no {fname} but the credit method trains the helper {hname!r}", path)
        # a helper may hold only buffers (ArCHer's replay buffer): load onto its first tensor's device
        first = next(iter(module.state_dict().values()), None)
        dev = str(first.device) if first is not None else "cpu"
        module.load_state_dict(load_file(str(path / fname), device=dev), strict=True)
    optim_state = None
    if "optim.pt" in manifest["files"]:
        optim_state = torch.load(path / "optim.pt", map_location=device, weights_only=False)
    return manifest, optim_state


def checkpoint_version(path: str | Path) -> int:
    """The policy version a checkpoint holds: the number of updates applied to the base policy
    (``init`` = 0, ``iter_<k>`` = k + 1, written by iteration k's update)."""
    name = Path(path).name
    if name == "init":
        return 0
    if name.startswith("iter_") and name[5:].isdigit():
        return int(name[5:]) + 1
    raise ValueError(f"{path} is not a run checkpoint (init or iter_<k>)")


def prune_checkpoints(root: Path, keep: int, protect: tuple[str, ...] = ("init",)) -> None:
    """Delete all but the ``keep`` newest ``iter_*`` checkpoints (``protect`` names are kept)."""
    ckpts = sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name not in protect)
    for p in ckpts[: max(len(ckpts) - keep, 0)]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
