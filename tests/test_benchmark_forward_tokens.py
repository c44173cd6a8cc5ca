"""Exact CA forward-token counts (issue 15 c): every forward pass the credit method, its scorer,
critic or continuations run is charged its rows' own lengths (``Overhead.forward_tokens``), not one
mean-length sequence per batched call; hand-computed on a real tiny policy."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.benchmark.budget import iteration_spend
from stages.credit.base import CreditContext, encode_text
from stages.credit.registry import build_method, get_method_class
from stages.rollout.config import ModelConfig
from stages.rollout.engine import GenerationRequest
from stages.rollout.hf_engine import HFEngine
from stages.rollout.policy import build_tiny_policy
from stages.rollout.scorer import HFScorer
from tests.test_credit_implicit import make_batch


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    texts = ["Solve 3+4*2\n4*2=8\n3+8=11\n", "Solve this correctly, checking every step.\n",
             "Solve this carelessly, with mistakes.\n"] * 6
    return build_tiny_policy(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                         intermediate_size=64), texts)


def method(name: str, **cfg):
    return build_method(get_method_class(name).Config(**cfg))


def test_treg_scorer_passes_are_charged_each_rows_length(tiny):
    """T-REG scores 2B contrastive contexts (instruction + prompt, then the response): the count is
    the sum of those rows' lengths, however the scorer chunks them, and less than the padded size."""
    model, tok = tiny
    batch = make_batch(tok, groups=2, per_group=3, seed=3)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    treg = method("t_reg", reg_weight=0.1)
    good, bad = encode_text(tok, treg.cfg.good_instruction), encode_text(tok, treg.cfg.bad_instruction)
    lens = [len(tr.prompt_ids) + len(tr.response_ids) for tr in batch.trajectories]
    hand = sum(len(good) + n for n in lens) + sum(len(bad) + n for n in lens)
    assert len(set(lens)) > 1  # rows of different lengths: a padded count would differ
    for chunk in (None, 2):  # one batched pass, or several chunks
        scorer = HFScorer(model, tok.pad_token_id, batch_size=chunk, max_tokens=None)
        res = treg(t, batch, CreditContext(scorer=scorer, tokenizer=tok))
        assert res.overhead.forward_tokens == hand
        assert res.overhead.extra_forward_passes == scorer.forward_passes == (1 if chunk is None else 6)
    padded = 2 * len(lens) * (max(lens) + max(len(good), len(bad)))
    assert hand < padded
    # the budget charges exactly that (no mean-length estimate when tokens are counted)
    metrics = {"overhead.credit.forward_tokens": float(hand), "overhead.credit.extra_forward_passes": 6.0}
    s = iteration_spend(metrics, batch_tokens=sum(lens), rows=len(lens), update_epochs=1)
    assert s.ca_forward_tokens == hand and s.forward_tokens == 2 * sum(lens) + hand


def test_gae_critic_pass_is_the_batch_tokens(tiny):
    """GAE's critic runs once over the batch: its cost is the trajectories' prompt + response tokens."""

    class ZeroCritic:  # the value model is not under test here, only what its pass is charged
        def values(self, tensors):
            return torch.zeros(tensors.response_mask.shape)

    _, tok = tiny
    batch = make_batch(tok, groups=2, per_group=3, seed=4)
    t = batch.to_tensors(pad_token_id=tok.pad_token_id)
    res = method("gae")(t, batch, CreditContext(critic=ZeroCritic()))
    assert res.overhead.forward_tokens == sum(len(tr.prompt_ids) + len(tr.response_ids) for tr in batch.trajectories)
    assert res.overhead.extra_forward_passes == len(batch)


def test_engine_counts_each_requests_context_and_generated_tokens(tiny):
    """What continuations and greedy episodes are charged: every request's context + its own
    generated tokens (rows stop at different lengths)."""
    model, tok = tiny
    engine = HFEngine(model, pad_token_id=tok.pad_token_id)
    ctx = [tok(s, add_special_tokens=False)["input_ids"] for s in ("Solve 3+4*2\n", "Solve", "3+8=11\n4*2")]
    reqs = [GenerationRequest(context_ids=list(c), seed=i) for i, c in enumerate(ctx)]
    outs = engine.generate(reqs, 6, {int(tok.eos_token_id or 0)}, temperature=1.0)
    assert engine.stats["forward_tokens"] == sum(map(len, ctx)) + sum(len(o.token_ids) for o in outs)
    before = engine.stats["forward_tokens"]
    engine.generate(reqs[:1], 2, set(), temperature=0.0)
    assert engine.stats["forward_tokens"] - before == len(ctx[0]) + 2


def test_passes_without_tokens_fall_back_to_the_mean_length_lower_bound():
    metrics = {"overhead.credit.extra_tokens": 6.0, "overhead.credit.extra_forward_passes": 2.0}
    s = iteration_spend(metrics, batch_tokens=100, rows=4, update_epochs=0)
    assert s.ca_forward_tokens == 6 + 2 * 25 and s.forward_tokens == 100 + 56
