"""``--threads N`` of a benchmark script as ``OMP_NUM_THREADS``, set before torch is imported (torch
reads it once; vLLM's CPU worker respects it too). Default 1: more OpenMP threads than free cores
collapse throughput on a shared machine (spin-waiting at every parallel region)."""

from __future__ import annotations

import os
import sys


def threads_from_argv() -> None:
    for i, a in enumerate(sys.argv):
        if a.startswith("--threads"):
            val = a.split("=", 1)[1] if "=" in a else sys.argv[i + 1]
            os.environ["OMP_NUM_THREADS"] = str(int(val))
            return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
