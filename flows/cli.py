"""``creditflow`` command line.

    creditflow train [overrides...]        run the five-stage loop (Prefect flow, MLflow tracking)
    creditflow resume RUN_ID [overrides]   continue a crashed/killed run; nothing finished is recomputed
    creditflow config show [overrides...]  print the resolved config
    creditflow checklist RUN_ID [--json]   the Appendix C reporting checklist of a run
    creditflow audit                       the checklist of every run in the tracking store (cf. Table 12)
    creditflow runs                        runs under $CREDITFLOW_HOME
    creditflow methods                     registered credit methods

Overrides: ``group=option`` (model, env, credit, update, experiment) or OmegaConf dotlist
``a.b=value``. Errors in the config are reported before any compute starts (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _print_summary(out: dict) -> None:
    print()
    print(f"run id:          {out['run_id']}")
    print(f"MLflow run:      {out['mlflow_run_id']}  (experiment '{out['experiment']}')")
    print(f"tracking store:  {out['tracking_uri']}")
    uri = out["tracking_uri"]
    if uri.startswith("sqlite:"):
        print(f"  browse it:     mlflow ui --backend-store-uri {uri}")
    print(f"success rate:    {out['success_before']:.3f} before -> {out['success_after']:.3f} after training")
    print(f"checklist:       creditflow checklist {out['run_id']}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="creditflow", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="start a training run")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--quiet", action="store_true", help="no per-stage progress lines")
    p.add_argument("--run-id", default=None, help="id of the new run (default: generated)")
    p = sub.add_parser("resume", help="resume a run")
    p.add_argument("run_id")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("config", help="config utilities")
    p.add_argument("action", choices=["show"])
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("checklist", help="print a run's reporting checklist")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("audit", help="checklist of all runs")
    p.add_argument("--experiment", default="creditflow")
    sub.add_parser("runs", help="list runs")
    sub.add_parser("methods", help="list credit methods")
    args = parser.parse_args(argv)

    import logging

    from flows.config import ConfigError

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"creditflow: config error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"creditflow: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd == "config":
        from flows.config import load_config, to_yaml

        print(to_yaml(load_config(args.overrides)), end="")
        return 0
    if args.cmd == "train":
        from flows.api import start_run

        _print_summary(start_run(args.overrides, progress=not args.quiet, run_id=args.run_id))
        return 0
    if args.cmd == "resume":
        from flows.api import resume_run

        _print_summary(resume_run(args.run_id, args.overrides, progress=not args.quiet))
        return 0
    if args.cmd == "checklist":
        from flows import checklist
        from flows.api import find_mlflow_run, tracker_for

        run = find_mlflow_run(tracker_for(), args.run_id)
        items = checklist.from_tags(run.data.tags)
        if args.json:
            print(json.dumps(checklist.as_json(items), indent=1))
        else:
            name = run.data.tags.get("creditflow.run_id", run.info.run_id)
            print(f"Reporting checklist (survey Appendix C) for run {name} "
                  f"[{run.data.tags.get('creditflow.method', '?')} on {run.data.tags.get('creditflow.env', '?')}, "
                  f"status {run.info.status}]\n")
            print(checklist.render(items))
        return 0
    if args.cmd == "audit":
        from flows import checklist
        from flows.api import tracker_for

        tracker = tracker_for(experiment=args.experiment)
        runs = tracker.client.search_runs([tracker.experiment_id], order_by=["attributes.start_time ASC"])
        if not runs:
            print("no runs in the tracking store")
            return 0
        table = [(r.data.tags.get("creditflow.run_id", r.info.run_id), checklist.from_tags(r.data.tags)) for r in runs]
        print(checklist.render_audit(table))
        for name, _ in table:
            r = next(x for x in runs if x.data.tags.get("creditflow.run_id", x.info.run_id) == name)
            print(f"  {name}: {r.data.tags.get('creditflow.method', '?')} on {r.data.tags.get('creditflow.env', '?')}"
                  f", {r.info.status}")
        return 0
    if args.cmd == "runs":
        from flows.runtime import creditflow_home

        root = creditflow_home() / "runs"
        for p in sorted(root.glob("*")) if root.is_dir() else []:
            info = json.loads((p / "run.json").read_text()) if (p / "run.json").is_file() else {}
            print(f"{p.name}  status={info.get('status', 'incomplete')}  mlflow={info.get('mlflow_run_id')}")
        return 0
    if args.cmd == "methods":
        from stages.credit.base import get_method_class, method_names

        for name in method_names():
            cls = get_method_class(name)
            print(f"{name:<24} {cls.granularity:<10} {cls.methodology}")
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
