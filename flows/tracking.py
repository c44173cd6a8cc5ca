"""MLflow tracking: one MLflow run per training run, metrics logged exactly once per step.

Embedded default: a SQLite store at ``$CREDITFLOW_HOME/mlflow.db`` with artifacts under
``$CREDITFLOW_HOME/mlartifacts`` (an explicit artifact location, so nothing lands in the
current directory). Each iteration's metrics go out in ONE ``log_batch`` call together with the
sentinel metric ``progress.iteration``; a resumed run first reads which steps the sentinel already
has and skips them, so no metric step is ever logged twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from flows.secrets import mask_config, mask_text

SENTINEL = "progress.iteration"
#: MLflow allows 100 params / 1000 metrics / 100 tags per log_batch
_PARAM_CHUNK = 100


def default_tracking_uri(home: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when set (e.g. a tracking server), else SQLite under the home."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"


class Tracker:
    """Thin wrapper over ``MlflowClient`` (no global active-run state)."""

    def __init__(self, uri: str, experiment: str, home: Path):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.home = home
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = None
            if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
                # a local store needs an explicit artifact location, else artifacts land in the cwd;
                # a tracking server decides its own (``--default-artifact-root`` / ``--serve-artifacts``)
                artifacts = (home / "mlartifacts").resolve()
                artifacts.mkdir(parents=True, exist_ok=True)
                location = artifacts.as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        self.run_id: Optional[str] = None
        self._logged: set[int] = set()

    # ------------------------------------------------------------------ run lifecycle
    def start(self, run_name: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=mask_text(run_name), tags=mask_config(tags))
        self.run_id = run.info.run_id
        return self.run_id

    def attach(self, run_id: str) -> None:
        """Re-open an existing MLflow run (resume) and learn which steps are already logged."""
        run = self.client.get_run(run_id)
        self.run_id = run.info.run_id
        if run.info.status != "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        self._logged = {int(m.step) for m in self.client.get_metric_history(self.run_id, SENTINEL)}

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status=status)

    # ------------------------------------------------------------------ logging
    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        params = mask_config(params)  # secret keys and secret values never reach MLflow
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, v[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), _PARAM_CHUNK):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAM_CHUNK])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:8000]) for k, v in mask_config({k: str(v) for k, v in tags.items()}).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i : i + 100])

    def has_step(self, step: int) -> bool:
        return step in self._logged

    def log_step(self, step: int, metrics: dict[str, float]) -> bool:
        """Log all ``metrics`` at ``step`` in one batch, unless that step is already logged."""
        import math
        import time

        from mlflow.entities import Metric

        if step in self._logged:
            return False
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in sorted(metrics.items())
                 if v is not None and math.isfinite(float(v))]
        items.append(Metric(SENTINEL, float(step), ts, step))
        for i in range(0, len(items), 1000):
            # the sentinel is the last metric of the last chunk: it is written only when all others are
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])
        self._logged.add(step)
        return True

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, mask_text(text), artifact_file)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=1, default=str), artifact_file)

    def log_file(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / Path(artifact_file).name
            fig.savefig(out, dpi=100)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(out), None if parent == "." else parent)
