"""``creditflow`` command line.

    creditflow train [overrides...]        run the five-stage loop (Prefect flow, MLflow tracking)
    creditflow resume RUN_ID [overrides]   continue a crashed/killed run; nothing finished is recomputed
    creditflow benchmark CONFIG [overrides]   CA benchmark: methods x tasks x seeds x lrs at a budget
    creditflow benchmark --resume BENCH_ID    continue it: finished cells are not re-run
    creditflow config show [overrides...]  print the resolved config
    creditflow config describe [GROUP] [env=NAME] [credit=NAME]   each key's type, default, rule and help
    creditflow checklist RUN_ID [--json]   the Appendix C reporting checklist of a run
    creditflow audit                       the checklist of every run in the tracking store (cf. Table 12)
    creditflow report ID [--out DIR] [--format html|md|both]   HTML/Markdown report of a run or benchmark
    creditflow runs                        runs under $CREDITFLOW_HOME
    creditflow methods [--setting A] [--format csv|json]   the survey's inventory (Appendix B) + status
    creditflow recommend [key=value ... | --profile F]     decision tree (survey §7.5, Table 8)
    creditflow sandbox build-image [--tag T] [--force]     build the Docker sandbox image offline
    creditflow prm train --env math --out DIR [...]        train a process reward model (PRM)
    creditflow serve [--poll-interval S] [--train-cron C]  start/schedule/resume runs from the Prefect UI

Overrides: ``group=option`` (model, env, credit, update, experiment) or OmegaConf dotlist
``a.b=value``. Errors in the config are reported before any compute starts (exit code 2).
``train`` / ``resume`` show a progress display (flows/progress.py) and write the libraries' logs,
warnings and a crash's traceback to ``<run dir>/creditflow.log`` (flows/runlog.py), not the console.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")  # Prefect's client telemetry (and its first-run notice on a terminal)
# the embedded (ephemeral) Prefect server gets 20 s to start by default: too short on a loaded small machine
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Prefect logs at its default level (INFO): flow/task run lines reach its API (the UI shows them);
# on the console they do not appear, a run's library logs go to its log file (flows/runlog.py)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _print_summary(out: dict, log_path: Optional[str] = None) -> None:
    print()
    print(f"run id:          {out['run_id']}")
    print(f"MLflow run:      {out['mlflow_run_id']}  (experiment '{out['experiment']}')")
    from flows.secrets import mask_text

    print(f"tracking store:  {mask_text(out['tracking_uri'])}")
    uri = out["tracking_uri"]
    if uri.startswith("sqlite:"):
        print(f"  browse it:     mlflow ui --backend-store-uri {uri}")
    print(f"success rate:    {out['success_before']:.3f} before -> {out['success_after']:.3f} after training")
    print(f"checklist:       creditflow checklist {out['run_id']}")
    if log_path:
        print(f"log:             {log_path}")


#: tools with their own options: ``creditflow NAME [VERB] ARGS...`` calls ``module.main(ARGS)``
#: (argparse's REMAINDER cannot forward arguments that start with ``--``, so these bypass the parser)
TOOLS = {
    "sandbox": ("environments.sandbox.image", "build-image", "sandbox images (`sandbox build-image --help`)"),
    "prm": ("flows.prm_cli", None, "process reward models (`prm train --help`)"),
    "serve": ("flows.serve", None, "deployments on a Prefect server for the UI (`serve --help`)"),
    "report": ("flows.report", None, "HTML/Markdown report of a run or benchmark (`report --help`)"),
}


def _run_tool(name: str, rest: list[str]) -> int:
    import importlib

    module, verb, _ = TOOLS[name]
    if verb is not None:
        if not rest or rest[0] != verb:
            got = f"got {rest[0]!r}" if rest else "got nothing"
            print(f"usage: creditflow {name} {verb} [options]  (see creditflow {name} {verb} --help)\n"
                  f"creditflow {name}: error: the only command is '{verb}', {got}", file=sys.stderr)
            return 0 if rest and rest[0] in ("-h", "--help") else 2
        rest = rest[1:]
    return int(importlib.import_module(module).main(rest) or 0)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="creditflow", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="start a training run")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--quiet", action="store_true", help="no progress display (the summary still prints)")
    p.add_argument("--run-id", default=None, help="id of the new run (default: generated)")
    p = sub.add_parser("resume", help="resume a run")
    p.add_argument("run_id")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser("benchmark", help="credit-assignment benchmark (configs/benchmark/<name>.yaml or a YAML path)")
    p.add_argument("args", nargs="*", metavar="CONFIG_OR_NAME [overrides]",
                   help="benchmark config name or path, then key=value overrides (e.g. seeds=2 budget.env_steps=500)")
    p.add_argument("--resume", metavar="BENCH_ID", help="continue benchmark BENCH_ID (only parallel=, runner.* overrides)")
    p.add_argument("--bench-id", default=None, help="id of the new benchmark (default: generated)")
    p = sub.add_parser("config", help="config utilities")
    p.add_argument("action", choices=["show", "describe"])
    p.add_argument("overrides", nargs="*", help="show: overrides; describe: [GROUP] [env=NAME] [credit=NAME]")
    p = sub.add_parser("checklist", help="print a run's reporting checklist")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the home's SQLite)")
    p.add_argument("--experiment", default="creditflow")
    p = sub.add_parser("audit", help="checklist of all runs")
    p.add_argument("--experiment", default="creditflow")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the home's SQLite)")
    sub.add_parser("runs", help="list runs")
    p = sub.add_parser("methods", help="the survey's method inventory (Appendix B) with implementation status")
    p.add_argument("--setting", help="R (reasoning), A (agentic) or M (multi-agent)")
    p.add_argument("--granularity", help="token, segment, step, turn, multi-agent, episode (substring match)")
    p.add_argument("--methodology", help="substring of the methodology column, e.g. MC, critic, shapley")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p = sub.add_parser("recommend", help="ranked candidate methods for a task profile (survey §7.5, Table 8)")
    p.add_argument("fields", nargs="*", help="profile fields as key=value, e.g. setting=agentic turns=30")
    p.add_argument("--profile", help="YAML or JSON file with the task profile")
    p.add_argument("--top", type=int, default=5)
    for name, (_, _verb, text) in TOOLS.items():  # listed in --help; dispatched before parsing (below)
        sub.add_parser(name, help=text, add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        return _run_tool(argv[0], argv[1:])
    args = parser.parse_args(argv)

    import logging

    from flows.config import ConfigError
    from flows.runtime import RunLockedError

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except RunLockedError as exc:
        print(f"creditflow: error: {exc}", file=sys.stderr)
        return 3
    except ConfigError as exc:
        from flows.secrets import mask_text

        print(f"creditflow: config error: {mask_text(str(exc))}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"creditflow: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    """``train`` / ``resume``: the progress display on the console, library logs in the run's log file.

    A config error keeps its one line (raised on to :func:`main`). Any other failure once the run
    directory exists is a crash: its traceback goes to the log file, the console gets one line with
    the error and where it was raised, the log's path and how to continue (exit 1; Ctrl-C: 130)."""
    import atexit

    from flows.api import resume_run, start_run
    from flows.config import ConfigError
    from flows.runlog import RunLog, format_crash
    from flows.runtime import RunLockedError

    log = RunLog()
    # kept until the process exits, after Prefect's own exit hooks (registered later, so run earlier):
    # stopping its temporary server is logged too
    atexit.register(log.stop)
    try:
        if args.cmd == "train":
            out = start_run(args.overrides, progress=not args.quiet, run_id=args.run_id, log=log)
        else:
            out = resume_run(args.run_id, args.overrides, progress=not args.quiet, log=log)
    except (ConfigError, RunLockedError):
        raise
    except (Exception, KeyboardInterrupt) as exc:
        if log.path is None:  # before the run directory existed: nothing to resume, no log file
            raise
        run_id = log.path.parent.name
        interrupted = isinstance(exc, KeyboardInterrupt)
        log.log_exception("interrupted" if interrupted else f"run {run_id} failed", exc)
        what = "interrupted" if interrupted else f"error: {format_crash(exc)}"
        print(f"creditflow: {what}\n  traceback and library logs: {log.path}\n"
              f"  continue with: creditflow resume {run_id}", file=sys.stderr)
        return 130 if interrupted else 1
    _print_summary(out, str(log.path) if log.path else None)
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    """``benchmark``: one line per finished cell, the learning table at the end; library logs in
    ``<home>/benchmarks/<id>/creditflow.log``. Exit 1 (with the resume command) if a cell failed."""
    import atexit
    import shlex

    from flows.benchmark import resume_benchmark, start_benchmark
    from flows.config import ConfigError
    from flows.runlog import RunLog, format_crash

    names = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if args.resume and names:
        raise ConfigError(f"benchmark --resume {args.resume} takes no config ({names[0]}): it has its own")
    if not args.resume and len(names) != 1:
        raise ConfigError("benchmark needs one config name or YAML path (e.g. creditflow benchmark bifurcation_small)"
                          + (f", got {' '.join(names)}" if names else ""))
    log = RunLog()
    atexit.register(log.stop)

    def say(text: str) -> None:
        print(text, flush=True)

    command = "creditflow " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if sys.argv[1:] else ["benchmark", *args.args]))
    try:
        if args.resume:
            out = resume_benchmark(args.resume, say=say, log=log, overrides=overrides)
        else:
            out = start_benchmark(names[0], overrides, bench_id=args.bench_id, command=command, say=say, log=log)
    except ConfigError:
        raise
    except (Exception, KeyboardInterrupt) as exc:
        if log.path is None:
            raise
        bench_id = log.path.parent.name
        interrupted = isinstance(exc, KeyboardInterrupt)
        log.log_exception("interrupted" if interrupted else f"benchmark {bench_id} failed", exc)
        print(f"creditflow: {'interrupted' if interrupted else 'error: ' + format_crash(exc)}\n"
              f"  traceback and library logs: {log.path}\n  continue with: creditflow benchmark --resume {bench_id}",
              file=sys.stderr)
        return 130 if interrupted else 1
    print(f"\nbenchmark {out['benchmark_id']}: {out['status']}  (MLflow run {out['mlflow_run_id']})")
    print(f"summary:         {log.path.parent / 'summary.json'}")
    print(f"{'task':<18} {'method':<10} {'best lr':>8} {'final success (95% CI)':>26} {'gap closed':>10} {'CA share':>8}")
    clipped = False
    for r in out["table"]:
        lo, hi = r.get("final_success_ci95_shown") or r["final_success_ci95"]
        clipped = clipped or bool(r.get("ci95_clipped"))
        ci = f"[{lo:.3f}, {hi:.3f}]{'*' if r.get('ci95_clipped') else ''}" if lo is not None else "[-]"
        gc = "-" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
        share = "-" if r["ca_overhead_share_forward_tokens"] is None else f"{r['ca_overhead_share_forward_tokens']:.3f}"
        mean = "-" if r["final_success_mean"] is None else f"{r['final_success_mean']:.3f}"
        print(f"{r['task']:<18} {r['method']:<10} {r['lr']:>8g} {mean + ' ' + ci:>26} {gc:>10} {share:>8}")
    if out.get("frontier"):
        from stages.benchmark.learning import frontier_grid

        headers, rows, clip_f = frontier_grid(out["frontier"])
        clipped = clipped or clip_f
        widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
        print("\nCA efficiency frontier: final success [95% CI] (share of the GRPO -> oracle gap closed), "
              "same budget for every cell")
        for line in [headers] + rows:
            print("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))).rstrip())
    if clipped:
        print("* 95% t-interval clipped to [0, 1] for display; the raw interval is final_success_ci95 in summary.json")
    if out["status"] != "finished":
        bad = [c["cell_id"] for c in out["cells"] if c["status"] not in ("finished", "budget_spent")]
        print(f"creditflow: {len(bad)} cells did not finish ({', '.join(bad[:5])}); "
              f"continue with: creditflow benchmark --resume {out['benchmark_id']}", file=sys.stderr)
        return 1
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    from flows.config import ConfigError

    if args.cmd == "config" and args.action == "describe":
        from flows.config import describe_config

        groups = [o for o in args.overrides if "=" not in o]
        if len(groups) > 1:
            raise ConfigError(f"config describe takes one group, got {' '.join(groups)}")
        print(describe_config(groups[0] if groups else None, [o for o in args.overrides if "=" in o]))
        return 0
    if args.cmd == "config":
        from omegaconf import OmegaConf

        from flows import secrets
        from flows.config import load_config

        cfg = load_config(args.overrides)
        print(OmegaConf.to_yaml(secrets.mask_config(cfg)), end="")
        return 0
    if args.cmd in ("train", "resume"):
        return _run(args)
    if args.cmd == "benchmark":
        return _benchmark(args)
    if args.cmd == "checklist":
        from flows import checklist
        from flows.api import find_mlflow_run, tracker_for

        run = find_mlflow_run(tracker_for(uri=args.tracking_uri, experiment=args.experiment), args.run_id)
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

        tracker = tracker_for(uri=args.tracking_uri, experiment=args.experiment)
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
        from stages.credit import inventory

        rows = inventory.filter_rows(inventory.load_inventory(), setting=args.setting,
                                     granularity=args.granularity, methodology=args.methodology)
        out = {"table": inventory.render_table, "csv": inventory.to_csv, "json": inventory.to_json}[args.format](rows)
        if args.format == "table" and not (args.setting or args.granularity or args.methodology):
            out += "\n" + inventory.render_extras(inventory.load_registry_extras())
        print(out, end="" if out.endswith("\n") else "\n")
        return 0
    if args.cmd == "recommend":
        from omegaconf import OmegaConf

        from stages.credit import decision_tree

        try:
            if args.profile:
                profile = decision_tree.TaskProfile.from_file(args.profile)
                if args.fields:
                    raise ValueError("give either --profile FILE or key=value fields, not both")
            else:
                bad = [f for f in args.fields if "=" not in f]
                if bad:
                    raise ValueError(f"profile fields must look like key=value, got {bad[0]!r}")
                values = OmegaConf.to_container(OmegaConf.from_dotlist(args.fields)) if args.fields else {}
                profile = decision_tree.TaskProfile.from_dict(values)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"task profile: {exc}") from None
        print(decision_tree.render(decision_tree.recommend(profile, top_k=args.top)))
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
