"""``runner.`` keys (where the rollout stage's shards run; see :mod:`flows.scaleout`).

Kept apart from :mod:`flows.scaleout` (which defines a Prefect task at import) so that the config
loader validates a run without importing Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from stages.config_fields import param

#: task runners of the flow
RUNNER_KINDS = ("local", "dask", "ray")


@dataclass
class RunnerConfig:
    """Keys allowed under ``runner.``: where the rollout stage's shards run (never part of the config
    hash: placement does not change what is computed, so a run may resume on another runner)."""

    kind: str = param("local", help="local (flow process) | dask (prefect-dask) | ray (prefect-ray): task runner of the flow", choices=RUNNER_KINDS)
    address: Optional[str] = param(None, help="scheduler to join (dask: tcp://host:8786; ray: auto or ray://host:10001); unset = start a local cluster")
    workers: int = param(2, help="local cluster only: worker processes (dask n_workers, ray num_cpus)", ge=1)
    rollout_shards: int = param(1, help="rollout stage: shards of whole groups, one task each (1 = unsharded, in the flow process)", ge=1)

    def config_rules(self):
        """Rules between fields (checked by stages.config_fields.check)."""
        if self.kind == "local" and self.address is not None:
            yield "address", "needs runner.kind=dask or ray (local runs in the flow process)"
        if self.kind == "dask" and self.address is not None and "://" not in str(self.address):
            yield "address", "for dask must look like tcp://host:8786"
