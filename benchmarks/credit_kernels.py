"""Timing of the vectorized episode-level estimators (stages/credit/functional.py).

Compares, in one run and on the same inputs (B=256 trajectories, T=2048 response tokens,
~20% observation tokens in multi-turn gaps, groups of 8):

* ``vectorized``  — :mod:`stages.credit.functional` (chunked scan / segment reductions);
* ``verl-style``  — the way verl's ``core_algos.py`` computes them: a Python loop over the T time
  steps with batch-vectorized ops (GAE, REINFORCE++), a Python loop over rows with per-group
  dicts (GRPO);
* ``loop ref``    — the per-row, per-token float64 reference of ``tests/reference_estimators.py``,
  timed on a subset of rows and scaled linearly to B (printed).

and, when the real verl is importable (run the script with ``.venv-verl/bin/python`` after
``bash infra/verl_env.sh``), a second table against **verl 0.9.1's own functions** in
``verl.trainer.ppo.core_algos`` for every estimator we share (GAE, GRPO, RLOO, REINFORCE++,
REINFORCE++-baseline, ReMax), each timed against the faster of verl's loop and vectorized
variants where it has both; the max difference of the outputs is printed beside each row.

Run: ``python benchmarks/credit_kernels.py [--threads 1,2] [--dtype float32|float64]`` (about
30-60 s on 2 cores; ``.venv-verl/bin/python benchmarks/credit_kernels.py`` adds the real-verl table). Times are the best of interleaved repeats; on a machine shared with other
work, multi-threaded torch (``--threads 2``) suffers from oversubscription far more than the
single-threaded step loop, so compare the 1-thread table there.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.credit import functional as F  # noqa: E402
from stages.credit.masked_stats import masked_whiten  # noqa: E402
from tests import reference_estimators as ref  # noqa: E402

# --------------------------------------------------------------------------------------------
# verl-style implementations (a loop over time steps / rows, as in verl's core_algos.py)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def verl_style_gae(token_level_rewards, values, response_mask, gamma, lam):
    nextvalues = torch.zeros_like(values[:, 0])
    lastgaelam = torch.zeros_like(values[:, 0])
    out = []
    for t in reversed(range(token_level_rewards.shape[-1])):
        m = response_mask[:, t]
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * m + (1 - m) * nextvalues
        lastgaelam = lastgaelam_ * m + (1 - m) * lastgaelam
        out.append(lastgaelam)
    advantages = torch.stack(out[::-1], dim=1)
    returns = advantages + values
    return masked_whiten(advantages, response_mask), returns


@torch.no_grad()
def verl_style_reinforce_pp(token_level_rewards, response_mask, gamma):
    returns = torch.zeros_like(token_level_rewards)
    running = torch.zeros_like(token_level_rewards[:, 0])
    for t in reversed(range(token_level_rewards.shape[1])):
        m = response_mask[:, t]
        new = token_level_rewards[:, t] + gamma * running
        returns[:, t] = new * m
        running = new * m + running * (1 - m)
    return masked_whiten(returns, response_mask) * response_mask, returns


@torch.no_grad()
def verl_style_grpo(token_level_rewards, response_mask, index, epsilon=1e-6):
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for k, lst in id2score.items():
        if len(lst) == 1:
            id2mean[k], id2std[k] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            st = torch.stack(lst)
            id2mean[k], id2std[k] = st.mean(), st.std()
    for i in range(scores.shape[0]):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
    adv = scores.unsqueeze(-1) * response_mask
    return adv, adv


# --------------------------------------------------------------------------------------------
# inputs and timing
# --------------------------------------------------------------------------------------------


def make_inputs(B: int, T: int, group: int, dtype: torch.dtype, seed: int = 0):
    """Multi-turn masks: turns of 20-200 policy tokens separated by observation gaps sized so
    that ~20% of the tokens before padding are observations; terminal + sparse turn rewards."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    rewards = torch.zeros(B, T)
    for i in range(B):  # input construction only, not timed
        t, length = 0, int(torch.randint(T // 2, T + 1, (1,), generator=g))
        while t < length:
            a = int(torch.randint(20, 200, (1,), generator=g))
            o = int(torch.randint(a // 8, a // 2 + 1, (1,), generator=g))
            mask[i, t : min(t + a, length)] = 1
            end = min(t + a, length) - 1
            rewards[i, end] = float(torch.rand(1, generator=g)) * 0.1
            t += a + o
        last = int(mask[i].nonzero().max())
        rewards[i, last] += float(torch.rand(1, generator=g) < 0.5)
    values = torch.rand(B, T, generator=g)
    index = torch.arange(B) // group
    return rewards.to(dtype), values.to(dtype), mask.to(dtype), index


def bench(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Best (min) wall time in ms of each callable over ``repeats`` runs, interleaved so that all
    of them see the same background load (min is the robust estimate on a shared machine)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) * 1e3 for k, v in times.items()}


def once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument(
        "--threads", default="1,2", help="comma-separated torch intra-op thread counts to time with (default 1,2)"
    )
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--ref-rows", type=int, default=16, help="rows the loop reference is timed on")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    threads = [int(x) for x in str(args.threads).split(",") if x.strip()]
    dtype = getattr(torch, args.dtype)
    B, T = args.batch, args.length
    r, v, m, idx = make_inputs(B, T, args.group, dtype)
    idx_np = idx.numpy()
    print(
        f"B={B} T={T} groups of {args.group} dtype={args.dtype} "
        f"torch={torch.__version__}; observation share of non-padding tokens: "
        f"{1 - float(m.sum()) / float((m.flip(-1).cumsum(-1).flip(-1) > 0).sum()):.1%}"
    )

    # sanity: the three implementations agree
    a_vec, _ = F.gae(r, v, m, 1.0, 0.95)
    a_verl, _ = verl_style_gae(r, v, m, 1.0, 0.95)
    g_vec, _ = F.grpo(r, m, idx)
    g_verl, _ = verl_style_grpo(r, m, idx_np)
    p_vec, _ = F.reinforce_pp(r, m, 0.99)
    p_verl, _ = verl_style_reinforce_pp(r, m, 0.99)
    print(
        "max |vectorized - verl-style|: "
        f"gae {float((a_vec - a_verl).abs().max()):.2e}, grpo {float((g_vec - g_verl).abs().max()):.2e}, "
        f"reinforce_pp {float((p_vec - p_verl).abs().max()):.2e}"
    )

    for n_threads in threads:
        torch.set_num_threads(n_threads)
        print(f"\n--- torch threads: {torch.get_num_threads()} ---")
        run_timings(args, r, v, m, idx, idx_np)


def real_verl():
    """verl's ``core_algos`` module when verl is importable in this interpreter, else None."""
    try:
        from verl.trainer.ppo import core_algos
    except ImportError:
        return None
    return core_algos


def real_verl_timings(C, args, r, v, m, idx, idx_np) -> None:
    """Ours against verl 0.9.1's functions on the same inputs: per estimator, (ours, verl's fastest
    variant, which one, max |ours - verl|)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"gamma": 0.99, "norm_adv_by_std_in_grpo": True})
    b = torch.rand(r.shape[0], generator=torch.Generator().manual_seed(1), dtype=r.dtype)
    cases = {
        "gae": (lambda: F.gae(r, v, m, 1.0, 0.95),
                {"loop": lambda: C.compute_gae_advantage_return(r, v, m, 1.0, 0.95)}),
        "grpo": (lambda: F.grpo(r, m, idx),
                 {"loop": lambda: C.compute_grpo_outcome_advantage(r, m, idx_np),
                  "vectorized": lambda: C.compute_grpo_vectorized_outcome_advantage(r, m, idx_np)}),
        "rloo": (lambda: F.rloo(r, m, idx),
                 {"loop": lambda: C.compute_rloo_outcome_advantage(r, m, idx_np),
                  "vectorized": lambda: C.compute_rloo_vectorized_outcome_advantage(r, m, idx_np)}),
        "reinforce_pp": (lambda: F.reinforce_pp(r, m, 0.99),
                         {"loop": lambda: C.compute_reinforce_plus_plus_outcome_advantage(r, m, config=cfg)}),
        "rf++_baseline": (lambda: F.reinforce_pp_baseline(r, m, idx),
                          {"loop": lambda: C.compute_reinforce_plus_plus_baseline_outcome_advantage(r, m, idx_np)}),
        "remax": (lambda: F.remax(r, b, m), {"loop": lambda: C.compute_remax_outcome_advantage(r, b, m)}),
    }
    print(f"\nreal verl (core_algos of verl {__import__('verl').__version__}): best of {args.repeats} "
          "interleaved runs, verl's faster variant")
    print(f"{'estimator':14s} {'ours ms':>9s} {'verl ms':>9s} {'variant':>11s} {'x vs verl':>10s} {'max |diff|':>11s}")
    for name, (ours, theirs) in cases.items():
        t = bench({"ours": ours, **theirs}, args.repeats)
        best = min(theirs, key=lambda k: t[k])
        diff = float((ours()[0] - theirs[best]()[0]).abs().max())
        print(f"{name:14s} {t['ours']:9.2f} {t[best]:9.2f} {best:>11s} {t[best] / t['ours']:10.2f} {diff:11.1e}")


def run_timings(args, r, v, m, idx, idx_np) -> None:
    C = real_verl()
    if C is not None:
        real_verl_timings(C, args, r, v, m, idx, idx_np)
    B = r.shape[0]
    n_ref = min(args.ref_rows, B)
    sub = slice(0, n_ref)
    scale = B / n_ref
    rows = []

    t = bench(
        {"vec": lambda: F.gae(r, v, m, 1.0, 0.95), "verl": lambda: verl_style_gae(r, v, m, 1.0, 0.95)}, args.repeats
    )
    t_ref = once(lambda: ref.ref_gae(r[sub], v[sub], m[sub], 1.0, 0.95)) * scale
    rows.append(("gae", t["vec"], t["verl"], t_ref))

    t = bench({"vec": lambda: F.grpo(r, m, idx), "verl": lambda: verl_style_grpo(r, m, idx_np)}, args.repeats)
    gsub = slice(0, max(args.group, (n_ref // args.group) * args.group))  # whole groups
    t_ref = once(lambda: ref.ref_grpo(r[gsub], m[gsub], idx[gsub])) * (B / gsub.stop)
    rows.append(("grpo", t["vec"], t["verl"], t_ref))

    t = bench(
        {"vec": lambda: F.reinforce_pp(r, m, 0.99), "verl": lambda: verl_style_reinforce_pp(r, m, 0.99)},
        args.repeats,
    )
    t_ref = once(lambda: ref.ref_reinforce_pp(r[sub], m[sub], 0.99)) * scale
    rows.append(("reinforce_pp", t["vec"], t["verl"], t_ref))

    print(
        f"loop reference timed on {n_ref} rows (grpo: {gsub.stop} rows, whole groups) and scaled "
        f"linearly to B={B} (one run); vectorized and verl-style: best of {args.repeats} interleaved runs on all rows"
    )
    print(f"{'estimator':14s} {'vectorized ms':>14s} {'verl-style ms':>14s} {'loop ref ms':>12s} "
          f"{'x vs verl':>10s} {'x vs ref':>10s}")
    for name, tv, tl, tr in rows:
        print(f"{name:14s} {tv:14.2f} {tl:14.2f} {tr:12.0f} {tl / tv:10.1f} {tr / tv:10.0f}")
    if C is None:
        print("real verl not importable here: `bash infra/verl_env.sh`, then run this script with "
              ".venv-verl/bin/python for the table against verl's own functions")


if __name__ == "__main__":
    main()
