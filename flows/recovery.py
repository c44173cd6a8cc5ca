"""Checkpoint recovery on resume: rebuild a checkpoint that fails verification, bit-identically.

The checkpoint that iteration ``it`` starts from is the output of the previous iteration's update
(or of prepare). Its inputs are all still there: the previous checkpoint (kept by
``prune_checkpoints``, which never keeps fewer than two) and that iteration's persisted reward and
credit results. So the producing stage is re-run on exactly those inputs with the same seed, and
the rebuilt weights are compared with the sha256 sums the lost checkpoint's manifest recorded.
Only a bit-identical rebuild is accepted: then nothing is lost and every persisted result of
later stages stays valid. Otherwise (the manifest itself is unreadable, or the rebuild differs)
the resume stops with an error that says what to do, rather than continuing from weights the
persisted results were not computed with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from stages.update.checkpoint import MANIFEST, CheckpointError, verify_checkpoint

if TYPE_CHECKING:
    from flows.runtime import RunState
    from flows.tracking import Tracker


def _weight_sums(manifest: dict[str, Any]) -> dict[str, str]:
    return {k: v["sha256"] for k, v in manifest["files"].items() if k.endswith(".safetensors")}


def rebuild_checkpoint(state: "RunState", run: Callable, tracker: "Tracker", it: int, bad: str,
                       prev: Optional[tuple[Any, Any, str]], exc: CheckpointError,
                       prepare_task: Any, update_task: Any) -> str:
    """Rebuild the checkpoint ``bad`` iteration ``it`` starts from (see the module docstring).

    ``run(task, key, iteration, *args, refresh=True)`` re-runs a stage and overwrites its persisted
    result; ``prev`` is the previous iteration's (reward result, credit result, input checkpoint),
    ``None`` when ``bad`` is the init checkpoint (then ``prepare_task`` re-runs: prepare is
    deterministic given the home's model cache); otherwise ``update_task`` re-runs. Returns the
    rebuilt checkpoint's path; raises :class:`CheckpointError` saying what to do when the rebuild
    cannot be shown identical."""
    bad_path = Path(bad)
    recorded: Optional[dict[str, str]] = None
    try:
        recorded = _weight_sums(json.loads((bad_path / MANIFEST).read_text()))
    except Exception:
        recorded = None
    print(f"\nwarning: {exc}\n  rebuilding it from the previous checkpoint", file=sys.stderr)
    if prev is None:
        state.drop_policy()
        producer, args, source = (prepare_task, "prepare", -1), (), "the base policy"
    else:
        reward, credit, before = prev
        try:
            verify_checkpoint(Path(before))
        except CheckpointError as exc2:
            raise CheckpointError(
                f"{exc}; the checkpoint before it is unusable too ({exc2}), so it cannot be rebuilt. The run "
                f"cannot be resumed losslessly; start a new run (same config) instead", bad_path) from None
        producer, args, source = (update_task, f"it{it - 1}-update", it - 1), (reward.value, credit.value, before), before
    result, _ = run(*producer, *args, refresh=True)
    rebuilt = Path(result.value["checkpoint"])
    now = _weight_sums(verify_checkpoint(rebuilt))
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
