"""Rollout throughput: transformers (HFEngine) vs vLLM (VLLMEngine), same prompts, same sampling.

Both engines get the same batch of prompts (``--batch`` contexts of ~40 tokens), sample
``--new-tokens`` tokens each at temperature 1 with no stop token (every row generates the full
length, so both do the same work), and return per-token log-probs and entropies. Tokens/s is
generated tokens over wall time, best of ``--repeats`` after one warm-up call; the ratio is
vLLM / transformers. Models:

* ``tiny``: the project's tiny Qwen2 policy (``stages.rollout.policy.build_tiny_policy``), with
  ``num_heads=2`` (head size 32: vLLM's CPU attention has no kernel for the default's 16);
* ``80m``: a Qwen2 config built locally, random weights (hidden 768, 12 layers, 12 heads,
  4 KV heads, MLP 2048, the tiny tokenizer's vocabulary, ~80M parameters).

vLLM variants: ``exact`` entropies (full-vocab log-probs, the default for small vocabularies)
and ``top1`` (``rollout.vllm_entropy_topk=1``: the sampled token's log-prob plus a top-1 entropy
estimate), to show what the full distribution costs.

Run in the vLLM environment: ``.venv-vllm/bin/python benchmarks/rollout.py [--models tiny,80m]``.
The transformers engine is timed before vLLM starts in the process (vLLM's CPU worker binds the
OpenMP threads of the process it runs in).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from stages.rollout.config import ModelConfig, RolloutConfig  # noqa: E402
from stages.rollout.engine import GenerationRequest  # noqa: E402
from stages.rollout.hf_engine import HFEngine  # noqa: E402
from stages.rollout.policy import build_tiny_policy, count_parameters  # noqa: E402

CORPUS = ["Task %d: pick one of A B C each step.\nStep %d. Action: %s\nYou played %s.\n" % (i, i % 5, c, c)
          for i in range(200) for c in "ABC"]


def build(name: str):
    model, tok = build_tiny_policy(ModelConfig(num_heads=2, num_kv_heads=1), CORPUS)
    if name == "tiny":
        return model, tok
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval(), tok


def requests(tok, batch: int) -> list[GenerationRequest]:
    out = []
    for i in range(batch):
        text = f"Task {i}: pick one of A B C each step.\nStep 0. Action: B\nYou played B.\nStep 1. Action: "
        out.append(GenerationRequest(tok(text, add_special_tokens=False)["input_ids"], seed=1000 + i))
    return out


def timed(engine, reqs, new_tokens: int, repeats: int) -> float:
    engine.generate(reqs, new_tokens, set())  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = engine.generate(reqs, new_tokens, set())
        dt = time.perf_counter() - t0
        best = max(best, sum(len(o.token_ids) for o in outs) / dt)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,80m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from stages.rollout.vllm_engine import VLLMEngine

    rows = []
    for name in args.models.split(","):
        model, tok = build(name)
        reqs = requests(tok, args.batch)
        hf = timed(HFEngine(model, pad_token_id=tok.pad_token_id), reqs, args.new_tokens, args.repeats)
        cfg = RolloutConfig(max_context_tokens=256, vllm_kv_cache_gib=1.0)
        res = {"hf": hf}
        for variant, topk in (("exact", 0), ("top1", 1)):
            cfg.vllm_entropy_topk = topk
            eng = VLLMEngine(model, cfg)
            res[variant] = timed(eng, reqs, args.new_tokens, args.repeats)
            res[variant + "_startup"] = eng.stats["startup_seconds"]
            t = eng.sync_weights()
            res[variant + "_sync"] = t
            eng.close()
            del eng
        rows.append((name, count_parameters(model), res))
        print(f"{name}: {count_parameters(model) / 1e6:.2f}M params, batch {args.batch} x {args.new_tokens} new tokens: "
              f"transformers {hf:.0f} tok/s | vLLM exact-entropy {res['exact']:.0f} tok/s "
              f"({res['exact'] / hf:.2f}x) | vLLM top-1 {res['top1']:.0f} tok/s ({res['top1'] / hf:.2f}x) | "
              f"vLLM start {res['exact_startup']:.1f} s, weight sync {res['exact_sync'] * 1e3:.0f} ms", flush=True)
    print("\nmodel   params   hf tok/s   vllm(exact) tok/s  ratio   vllm(top1) tok/s  ratio   sync ms")
    for name, n, r in rows:
        print(f"{name:6s} {n / 1e6:7.2f}M {r['hf']:9.0f} {r['exact']:18.0f} {r['exact'] / r['hf']:6.2f}x "
              f"{r['top1']:17.0f} {r['top1'] / r['hf']:6.2f}x {r['exact_sync'] * 1e3:8.0f}")


if __name__ == "__main__":
    main()
