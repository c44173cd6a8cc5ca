"""Rollout throughput: transformers (HFEngine) vs vLLM (VLLMEngine), same prompts, same sampling.

Two workloads (``--workload``):

* ``multiturn``: what the rollout stage does: bifurcation episodes (``--horizon`` turns,
  ``--turn-tokens`` tokens per turn at most) played by the real agent loop; every turn re-sends
  each episode's whole context. See :func:`bench_multiturn`.
* ``batch`` (default): one ``generate`` call, below.

Batch workload, shaped like one turn of the rollout stage: ``--tasks`` distinct task prompts (a task line plus
``--history`` played steps), each repeated
``--group-size`` times (``rollout.group_size``, default 8: GRPO samples a group of continuations
of the same context) with a different per-request seed. Every request samples ``--new-tokens``
tokens at temperature 1, top-p 1, with no stop token, so both engines do the same work, and
returns per-token behaviour log-probs and exact entropies. Tokens/s = generated tokens / wall
time of one ``generate`` call. After one warm-up call per engine the engines take turns,
``--repeats`` rounds (hf, vllm, generate, hf, vllm, ...: load on the machine hits all alike);
reported are the median tokens/s of each engine and the median of the per-round ratios vLLM / hf
and vLLM / generate. ``--history`` is a list, one row each: the default ``6,24`` times a first
turn (91-token prompts with the tiny tokenizer) and a mid-episode turn (307-token contexts).

Why the ratio depends on the prompt length (measured on this 2-core AVX2 machine, 1 thread): both
engines are bound by the same fp32 GEMMs (oneDNN in vLLM, MKL in torch: 60-85 GFLOP/s on one core at
these shapes), so vLLM's gain is work it avoids, not faster arithmetic. It prefills a group's shared
context once (prefix caching; only whole 32-token KV blocks are shared, so the tail of each prompt
after its last full block is recomputed per sample: 7,168 of 11,648 prompt tokens came from the
cache at 91 tokens) where HFEngine prefills every sample; its decode step is also cheaper (80m, 128
sequences: 350 ms vs about 490 ms). The longer the shared context, the more work avoided: 91-token
prompts gave 1.4-1.5x (3m) and 1.7-1.9x (80m) over several runs, 307-token contexts 3.3-3.5x and
3.5-3.8x. On the tiny model vLLM's per-step scheduling in Python (~10 ms for 128 sequences) costs
more than the model itself.

Two transformers baselines: ``hf`` is creditflow's own engine (``HFEngine``: one batched prefill,
a KV-cache decode loop, per-request counter-based sampling, no per-token Python work), the one the
pipeline uses; ``generate`` is stock ``model.generate(do_sample=True, output_scores=True)``, the
path most RL trainers call, with log-probs and entropies computed from its scores afterwards.

Models:

* ``tiny``: the project's tiny Qwen2 policy (``stages.rollout.policy.build_tiny_policy``) with
  ``num_heads=2`` (head size 32: vLLM's CPU attention has no kernel for the default's 16);
* ``3m``: a Qwen2 config built locally, random weights (hidden 256, 4 layers, 4 heads of size 64,
  2 KV heads, MLP 704, tied embeddings off: ~2.9M parameters);
* ``80m``: a Qwen2 config built locally, random weights (hidden 768, 12 layers, 12 heads of
  size 64, 4 KV heads, MLP 2048, tied embeddings off, the tiny tokenizer's vocabulary: ~77M
  parameters).

vLLM runs with the engine's defaults (in-process, ``enforce_eager``, no chunked prefill on CPU,
automatic prefix caching, exact entropy computed in the worker) and ``rollout.vllm_block_size``
from ``--block-size`` (default 32, the engine's CPU default: vLLM's own CPU default of 128-token
KV blocks can never share (prefix-cache) a prompt shorter than 128 tokens, 32 can). ``--dtypes float32,bfloat16`` also times bf16 (HF and vLLM both in bf16).
Both engines use the same number of torch/OpenMP threads (``--threads``, default 1: what vLLM's
CPU worker picks for serving by itself; set through ``OMP_NUM_THREADS`` before torch loads,
which vLLM respects). On a machine shared with other jobs, more OpenMP threads than free cores
collapse throughput (spin-waiting at every parallel region: transformers fell from ~12,000 to
~400 tok/s on the tiny model with 2 threads on 2 busy cores), so compare with 1 thread there.

Run in the vLLM environment: ``.venv-vllm/bin/python benchmarks/rollout.py``, e.g.
``--models 80m --tasks 4 --new-tokens 32`` for a quick 80M run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._threads import threads_from_argv  # noqa: E402

threads_from_argv()
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

from stages.rollout.config import ModelConfig, RolloutConfig  # noqa: E402
from stages.rollout.engine import GenerationRequest  # noqa: E402
from stages.rollout.hf_engine import HFEngine  # noqa: E402
from stages.rollout.policy import build_tiny_policy, count_parameters  # noqa: E402

CORPUS = ["Task %d: pick one of A B C each step.\nStep %d. Action: %s\nYou played %s.\n" % (i, i % 5, c, c)
          for i in range(200) for c in "ABC"]
#: per-model workload defaults: (tasks, new tokens); the 80M model gets fewer so a run ends in minutes on 2 cores
DEFAULTS = {"tiny": (16, 64), "3m": (16, 64), "80m": (4, 32)}
#: locally built Qwen2 shapes: hidden, MLP, layers, heads, KV heads (head size 64 throughout)
SHAPES = {"3m": (256, 704, 4, 4, 2), "80m": (768, 2048, 12, 12, 4)}


def build(name: str):
    model, tok = build_tiny_policy(ModelConfig(num_heads=2, num_kv_heads=1), CORPUS)
    if name == "tiny":
        return model, tok
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, mlp, layers, heads, kv_heads = SHAPES[name]
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval(), tok


def prompt(task: int, history: int) -> str:
    text = f"Task {task}: pick one of A B C each step.\n"
    for s in range(history):
        a = "ABC"[(task * 7 + s * s + s // 2) % 3]
        text += f"Step {s}. Action: {a}\nYou played {a}.\n"
    return text + f"Step {history}. Action: "


def requests(tok, tasks: int, group_size: int, history: int) -> list[GenerationRequest]:
    out = []
    for t in range(tasks):
        ids = tok(prompt(t, history), add_special_tokens=False)["input_ids"]
        out.extend(GenerationRequest(list(ids), seed=1000 + t * group_size + g) for g in range(group_size))
    return out


class StockGenerate:
    """The stock transformers path (``model.generate(do_sample=True, output_scores=True)``, what
    TRL-style trainers call), as a second baseline: same left-padded batch, same sampling
    settings; log-probs and entropies computed afterwards from the returned scores. One torch
    generator per call (stock ``generate`` has no per-request seeds)."""

    def __init__(self, model, pad_token_id: int):
        self.model, self.pad = model, pad_token_id

    def generate(self, reqs, new_tokens: int, stops) -> list:
        from stages.rollout.engine import GenerationOutput

        L = max(len(r.context_ids) for r in reqs)
        ids = torch.tensor([[self.pad] * (L - len(r.context_ids)) + list(r.context_ids) for r in reqs])
        attn = (torch.arange(L)[None, :] >= torch.tensor([L - len(r.context_ids) for r in reqs])[:, None]).long()
        torch.manual_seed(reqs[0].seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=1.0, top_p=1.0,
                                      top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      output_scores=True, return_dict_in_generate=True, pad_token_id=self.pad)
            logp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)  # (B, T, V)
            toks = out.sequences[:, L:]
            lps = logp.gather(-1, toks[..., None]).squeeze(-1)
            ents = torch.special.entr(logp.exp()).sum(-1)
        return [GenerationOutput(t, lp, e, "length") for t, lp, e in zip(toks.tolist(), lps.tolist(), ents.tolist())]


def run_once(engine, reqs, new_tokens: int) -> float:
    t0 = time.perf_counter()
    outs = engine.generate(reqs, new_tokens, set())
    dt = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    assert n == len(reqs) * new_tokens and all(len(o.entropies) == len(o.token_ids) for o in outs)
    return n / dt


def bench_model(name: str, args, dtype: str) -> list[dict]:
    """One row per prompt length (``--history``), engines built once per model and dtype."""
    from stages.rollout.vllm_engine import VLLMEngine

    model, tok = build(name)
    model = model.to(getattr(torch, dtype))
    tasks, new_tokens = DEFAULTS[name]
    tasks = args.tasks or tasks
    new_tokens = args.new_tokens or new_tokens
    hf = HFEngine(model, pad_token_id=tok.pad_token_id)
    cfg = RolloutConfig(max_context_tokens=512, vllm_kv_cache_gib=args.kv_cache_gib, vllm_max_num_seqs=256,
                        vllm_block_size=args.block_size)
    vl = VLLMEngine(model, cfg)
    engines = {"hf": hf, "vllm": vl, "generate": StockGenerate(model, tok.pad_token_id)}
    rows = []
    for history in args.histories:
        reqs = requests(tok, tasks, args.group_size, history)
        for eng in engines.values():  # warm-up (this prompt length's shapes)
            eng.generate(reqs, min(new_tokens, 4), set())
        vl.llm.reset_prefix_cache()  # timed calls start cold: prefix reuse only within a call (its groups)
        rates: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(args.repeats):
            for k, eng in engines.items():
                rates[k].append(run_once(eng, reqs, new_tokens))
                if k == "vllm":
                    vl.llm.reset_prefix_cache()
        rows.append({
            "model": name, "dtype": dtype, "params": count_parameters(model), "prompts": len(reqs), "tasks": tasks,
            "history": history, "prompt_tokens": sorted({len(r.context_ids) for r in reqs}), "new_tokens": new_tokens,
            "hf": statistics.median(rates["hf"]), "vllm": statistics.median(rates["vllm"]),
            "ratio": statistics.median(v / h for v, h in zip(rates["vllm"], rates["hf"])),
            "generate": statistics.median(rates["generate"]),
            "ratio_generate": statistics.median(v / g for v, g in zip(rates["vllm"], rates["generate"])),
            "ratios": [v / h for v, h in zip(rates["vllm"], rates["hf"])],
        })
    syncs = [vl.sync_weights() for _ in range(3)]
    for r in rows:
        r.update(startup=vl.stats["startup_seconds"], sync=statistics.median(syncs), entropy=vl.entropy_mode)
    vl.close()
    return rows


def play(engine, tok, family, envb, cfg, seed: int) -> tuple[float, int, int]:
    """One rollout stage's worth of episodes through the real agent loop: (tokens/s, generated
    tokens, context tokens sent to the engine)."""
    from stages.rollout.agent_loop import run_episodes

    envs = [family.make(s.instance, None, s.episode_seed) for s in envb.slots]
    calls: list[int] = []
    inner = engine.generate

    def counting(reqs, *a, **k):
        calls.append(sum(len(r.context_ids) for r in reqs))
        return inner(reqs, *a, **k)

    engine.generate = counting
    try:
        t0 = time.perf_counter()
        trajs = run_episodes(engine, tok, envs, [s.group_id for s in envb.slots], [s.instance.task_id for s in envb.slots],
                             [s.uid for s in envb.slots], family.name, cfg, seed)
        dt = time.perf_counter() - t0
    finally:
        del engine.generate
    gen = sum(t.meta.get("generated_tokens", t.num_policy_tokens) for t in trajs)
    return gen / dt, gen, sum(calls)


def bench_multiturn(name: str, args, dtype: str) -> dict:
    """The rollout stage's own workload: ``--tasks`` bifurcation instances x ``--group-size``
    episodes of ``--horizon`` turns played by ``stages.rollout.agent_loop.run_episodes``. Every
    turn re-sends each episode's whole context (prompt + earlier turns + observations) and the
    policy's turn ends at its stop token or after ``--turn-tokens`` tokens: HFEngine prefills the
    whole context every turn, vLLM's prefix cache keeps earlier turns' KV blocks. The engines
    sample different tokens (different samplers), so the episodes differ; both play the same
    instances and seeds, and tokens/s counts what each generated."""
    from environments.construct import build_env_batch
    from environments.tasks.bifurcation import BifurcationConfig, BifurcationFamily
    from stages.rollout.vllm_engine import VLLMEngine

    model, tok = build(name)
    model = model.to(getattr(torch, dtype))
    family = BifurcationFamily(BifurcationConfig(horizon=args.horizon, num_decisive=2))
    tasks = args.tasks or 16
    envb = build_env_batch(family, tasks, args.group_size, tasks, 0, 0)
    cfg = RolloutConfig(max_context_tokens=2048, max_new_tokens_per_turn=args.turn_tokens,
                        vllm_kv_cache_gib=args.kv_cache_gib, vllm_max_num_seqs=256, vllm_block_size=args.block_size)
    engines = {"hf": HFEngine(model, pad_token_id=tok.pad_token_id), "vllm": VLLMEngine(model, cfg)}
    for eng in engines.values():  # warm-up
        play(eng, tok, family, build_env_batch(family, 2, 2, tasks, 1, 0), cfg, 1)
    rates: dict[str, list[float]] = {k: [] for k in engines}
    info: dict[str, tuple[int, int, int]] = {}  # engine -> (generated, context sent, context from the prefix cache)
    for r in range(args.repeats):
        for k, eng in engines.items():
            if k == "vllm":
                eng.llm.reset_prefix_cache()
            cached0 = eng.stats.get("cached_prompt_tokens", 0)
            rate, gen, ctx = play(eng, tok, family, envb, cfg, 7)
            rates[k].append(rate)
            info[k] = (gen, ctx, eng.stats.get("cached_prompt_tokens", 0) - cached0)
    res = {
        "model": name, "dtype": dtype, "params": count_parameters(model), "episodes": len(envb.slots),
        "hf": statistics.median(rates["hf"]), "vllm": statistics.median(rates["vllm"]),
        "ratio": statistics.median(v / h for v, h in zip(rates["vllm"], rates["hf"])),
        "ratios": [v / h for v, h in zip(rates["vllm"], rates["hf"])], "info": info,
    }
    engines["vllm"].close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="batch", choices=["batch", "multiturn"],
                    help="batch: one generate call of grouped prompts; multiturn: bifurcation episodes through the agent loop")
    ap.add_argument("--horizon", type=int, default=8, help="multiturn: turns per episode")
    ap.add_argument("--turn-tokens", type=int, default=4, help="multiturn: rollout.max_new_tokens_per_turn")
    ap.add_argument("--models", default="tiny,3m,80m")
    ap.add_argument("--dtypes", default="float32", help="comma list of float32, bfloat16")
    ap.add_argument("--tasks", type=int, default=0, help="distinct prompts (0 = per-model default: tiny 16, 3m 16, 80m 4)")
    ap.add_argument("--group-size", type=int, default=8, help="samples per prompt (rollout.group_size; 1 = all distinct)")
    ap.add_argument("--history", default="6,24",
                    help="batch: comma list of played steps per prompt, one row each (6: 91-token first-turn "
                         "prompts; 24: 307-token mid-episode contexts)")
    ap.add_argument("--new-tokens", type=int, default=0, help="tokens sampled per request (0 = tiny 64, 3m 64, 80m 32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=32, help="vLLM KV block size (CPU default 128)")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads of both engines (default 1, or $OMP_NUM_THREADS)")
    args = ap.parse_args()
    args.histories = [int(h) for h in str(args.history).split(",")]
    print(f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; vLLM "
          f"in-process, enforce_eager, prefix caching, block_size {args.block_size}, max_num_seqs 256, KV cache "
          f"{args.kv_cache_gib} GiB{', no chunked prefill (CPU)' if not torch.cuda.is_available() else ''}; "
          f"temperature 1, top_p 1, group size {args.group_size}", flush=True)
    if args.workload == "multiturn":
        print("\nmultiturn: model  dtype   params  episodes  hf tok/s  vllm tok/s  vllm/hf  (generated, context sent, "
              "context from vLLM's prefix cache)")
        for name in args.models.split(","):
            for dtype in args.dtypes.split(","):
                r = bench_multiturn(name, args, dtype)
                (hg, hc, _), (vg, vc, vcached) = r["info"]["hf"], r["info"]["vllm"]
                print(f"multiturn: {name:6s} {dtype:8s} {r['params'] / 1e6:6.2f}M {r['episodes']:5d} {r['hf']:10.0f} "
                      f"{r['vllm']:11.0f} {r['ratio']:7.2f}x  (per round {', '.join(f'{x:.2f}' for x in r['ratios'])}; "
                      f"hf {hg} gen / {hc} ctx, vLLM {vg} gen / {vc} ctx, {vcached} cached)", flush=True)
        return
    rows = []
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for r in bench_model(name, args, dtype):
                rows.append(r)
                print(f"{name} {dtype}: {r['params'] / 1e6:.2f}M params, {r['prompts']} prompts ({r['tasks']} tasks x "
                      f"{args.group_size}, {r['prompt_tokens'][0]}-{r['prompt_tokens'][-1]} tokens) x {r['new_tokens']} new "
                      f"tokens: transformers {r['hf']:.0f} tok/s (stock generate {r['generate']:.0f}) | vLLM {r['vllm']:.0f} "
                      f"tok/s | ratio {r['ratio']:.2f}x (vs stock generate {r['ratio_generate']:.2f}x) "
                      f"(per round {', '.join(f'{x:.2f}' for x in r['ratios'])}) | vLLM startup {r['startup']:.1f} s, "
                      f"weight sync {r['sync'] * 1e3:.0f} ms | entropy {r['entropy']}", flush=True)
    print("\nmodel  dtype     params  prompt tok  prompts x new   hf tok/s  vllm tok/s  vllm/hf  generate tok/s  "
          "vllm/generate  startup s  sync ms")
    for r in rows:
        print(f"{r['model']:6s} {r['dtype']:8s} {r['params'] / 1e6:6.2f}M {r['prompt_tokens'][-1]:10d} {r['prompts']:5d} x "
              f"{r['new_tokens']:<4d} {r['hf']:10.0f} {r['vllm']:11.0f} {r['ratio']:7.2f}x {r['generate']:15.0f} "
              f"{r['ratio_generate']:13.2f}x {r['startup']:9.1f} {r['sync'] * 1e3:8.0f}")


if __name__ == "__main__":
    main()
