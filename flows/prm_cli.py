"""``creditflow prm train``: train a process reward model on a task family's checked steps.

The command-line side of :mod:`stages.reward.prm` (survey §3.3.1): it plays episodes of a task
family with the run's policy (the cached tiny policy, or ``--model-path``) under the family's
experiment config (``configs/experiment/<env>.yaml``, so the rollout settings are those of a
training run), labels every step by the family's procedural check, adds labelled reference
solutions, trains the PRM and saves it (safetensors + config.json + tokenizer). It lives in
``flows`` because it resolves run configs (:mod:`flows.config`); the PRM itself, its training and
the labelling are stage code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import environments.tasks  # noqa: F401  (registers the built-in families)
from environments.registry import get_family_class
from flows.config import configs_dir, load_config, to_object
from stages.reward.process import StepCheckRewards
from stages.reward.prm import (
    Example,
    PRMConfig,
    evaluate_prm,
    reference_examples,
    save_prm,
    train_prm,
)



def examples_from_trajectories(trajectories: Sequence[Any]) -> list[Example]:
    """``(prompt_text, [action texts], [step labels])`` per trajectory, labels from the family's
    procedural step checks (:class:`stages.reward.process.StepCheckRewards`)."""
    from stages.schema import Batch

    trajs = [t for t in trajectories if t.turns]
    if not trajs:
        return []
    labels, _ = StepCheckRewards()(Batch(list(trajs)))
    return [
        (t.prompt_text, [turn.action_text for turn in t.turns], labels[i, : len(t.turns)].tolist())
        for i, t in enumerate(trajs)
    ]


def collect_examples(env: str, episodes: int, seed: int, home: Optional[Path] = None,
                     model_path: Optional[str] = None, split: str = "train",
                     with_reference: bool = True) -> tuple[list[Example], Any]:
    """Play ``episodes`` episodes of task family ``env`` with the run's policy (the cached tiny
    policy, built and warmed up if needed, or ``model_path``) and label every step by the
    family's procedural check; with ``with_reference`` add :func:`reference_examples` of the
    same instances. Returns ``(examples, tokenizer of the policy)``."""
    from stages.rollout.policy import get_policy
    from stages.rollout.warmup import play_instances

    fam_cls = get_family_class(env)
    # the family's experiment config (configs/experiment/<env>.yaml) where there is one: its rollout
    # settings (tokens per turn, context) and policy are the ones training runs play the family with
    overrides = [f"experiment={env}"] if (configs_dir() / "experiment" / f"{env}.yaml").is_file() else [f"env={env}"]
    if model_path is not None:
        overrides.append(f"model.path={model_path}")
    run_cfg = to_object(load_config(overrides))
    family = fam_cls(run_cfg.env if isinstance(run_cfg.env, fam_cls.Config) else fam_cls.Config())
    if family.needs_sandbox:
        raise ValueError(f"creditflow prm train: task family {env!r} runs in a sandbox; collect episodes with a training run instead")
    home = Path(home) if home is not None else Path(os.environ.get("CREDITFLOW_HOME", "./.creditflow")).expanduser()
    model, tokenizer, _ = get_policy(run_cfg.model, family, home, seed, run_cfg.rollout)
    instances = family.instances(split, episodes, seed)
    trajs = play_instances(model, tokenizer, family, instances, seed, uid_prefix=f"prm-{split}",
                           episode_seeds=[seed + i for i in range(len(instances))], cfg=run_cfg.rollout)
    examples = examples_from_trajectories(trajs)
    if with_reference:
        examples += reference_examples(family, instances, seed)
    return examples, tokenizer


def main(argv: Optional[list[str]] = None) -> int:
    """``creditflow prm train --env math --out DIR [--steps N] [--episodes N] [--seed S] ...``"""
    parser = argparse.ArgumentParser(prog="creditflow prm", description="process reward models (survey §3.3.1)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a PRM on procedurally checked steps of a task family's episodes")
    t.add_argument("--env", default="math", help="task family whose episodes are labelled (default: math)")
    t.add_argument("--out", required=True, help="output directory (safetensors + config.json + tokenizer)")
    t.add_argument("--episodes", type=int, default=512, help="training episodes played with the policy")
    t.add_argument("--eval-episodes", type=int, default=128, help="held-out eval-split episodes for the accuracy report")
    t.add_argument("--seed", type=int, default=0, help="seed of episodes, weights and minibatches")
    t.add_argument("--model-path", default=None, help="local HF policy directory (default: the cached tiny policy)")
    t.add_argument("--no-reference", action="store_true",
                   help="train only on the policy's own episodes (no labelled reference solutions)")
    for f in dataclasses.fields(PRMConfig):
        if f.name in ("seed",):
            continue
        t.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default, dest=f.name)
    args = parser.parse_args(argv)
    cfg = PRMConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PRMConfig) if f.name != "seed"},
                    seed=args.seed)
    try:
        train, tokenizer = collect_examples(args.env, args.episodes, args.seed, model_path=args.model_path,
                                            with_reference=not args.no_reference)
        held, _ = collect_examples(args.env, args.eval_episodes, args.seed + 1, model_path=args.model_path,
                                   split="eval", with_reference=not args.no_reference) if args.eval_episodes > 0 else ([], None)
    except (KeyError, ValueError) as exc:
        print(f"creditflow prm train: {exc}", file=sys.stderr)
        return 2
    model, stats = train_prm(train, cfg, tokenizer=tokenizer, log_every=max(cfg.steps // 10, 1))
    if held:
        stats["eval"] = evaluate_prm(model, held)
    stats["train_eval"] = evaluate_prm(model, train)
    out = save_prm(model, args.out, stats={**stats, "env": args.env, "episodes": args.episodes})
    print(json.dumps({"out": str(out), **stats}, indent=1, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
