"""Stage 5: losses against hand-written formulas, NaN guard, atomic checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from stages.update.checkpoint import CheckpointError, load_checkpoint, prune_checkpoints, save_checkpoint, verify_checkpoint
from stages.update.losses import aggregate, clipped_policy_loss, kl_k3, value_loss


def _ref_ppo(lp, old, adv, mask, eps, agg):
    rows = []
    for i in range(len(lp)):
        vals = []
        for j in range(len(lp[0])):
            if mask[i][j]:
                r = math.exp(lp[i][j] - old[i][j])
                vals.append(max(-adv[i][j] * r, -adv[i][j] * min(max(r, 1 - eps), 1 + eps)))
        rows.append(vals)
    if agg == "token-mean":
        flat = [v for r in rows for v in r]
        return sum(flat) / len(flat)
    per = [sum(r) / len(r) for r in rows if r]
    return sum(per) / len(per)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_clipped_loss_matches_formula(agg):
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.3
    old = lp + torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(5, 7, generator=g) > 0.3).double()
    mask[0, 0] = 1
    loss, stats = clipped_policy_loss(lp, old, adv, mask, 0.2, agg)
    assert float(loss) == pytest.approx(_ref_ppo(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, agg), abs=1e-10)
    assert 0.0 <= stats["clip_fraction"] <= 1.0


def test_seq_mean_weights_sequences_equally():
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    assert float(aggregate(loss, mask, "token-mean")) == pytest.approx(7 / 5)
    assert float(aggregate(loss, mask, "seq-mean-token-mean")) == pytest.approx(2.0)


def test_k3_kl_nonnegative_and_zero_at_equality():
    a = torch.randn(100, dtype=torch.float64)
    b = torch.randn(100, dtype=torch.float64)
    assert (kl_k3(a, b) >= 0).all()
    assert torch.allclose(kl_k3(a, a), torch.zeros(100, dtype=torch.float64))
    # k3 is an unbiased estimator of KL(p||q) when sampling from p (checked on a categorical)
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    est = float((p * kl_k3(p.log(), q.log())).sum())
    assert est == pytest.approx(exact, abs=1e-12)


def test_value_loss_clipping():
    v = torch.tensor([[2.0]])
    g = torch.tensor([[0.0]])
    m = torch.ones(1, 1)
    assert float(value_loss(v, g, m)) == pytest.approx(2.0)
    assert float(value_loss(v, g, m, old_values=torch.tensor([[1.0]]), clip=0.5)) == pytest.approx(2.0)


def _tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg)


def test_checkpoint_roundtrip_and_corruption_detected(tmp_path):
    m = _tiny_model()
    path = save_checkpoint(tmp_path, "iter_0000", m, optim_state={"x": 1}, meta={"iteration": 0})
    m2 = _tiny_model()
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(1.0)
    _, opt = load_checkpoint(path, m2)
    assert opt == {"x": 1}
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    # tied embeddings stay tied after loading
    assert m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()
    # truncate the weights file: detected before any tensor is used
    f = path / "policy.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        verify_checkpoint(path)


def test_crash_before_rename_leaves_no_partial_checkpoint(tmp_path):
    m = _tiny_model()

    def boom():
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, "iter_0001", m, before_rename=boom)
    assert not (tmp_path / "iter_0001").exists()
    assert not list(tmp_path.glob(".*tmp*"))  # cleaned on exception
    # an abandoned temp dir (process killed) is never taken for a checkpoint and is pruned later
    (tmp_path / ".iter_0002.tmp-999-abc").mkdir()
    save_checkpoint(tmp_path, "iter_0002", m)
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0002"]


def test_trainer_skips_nonfinite_steps():
    from stages.schema import CreditResult
    from stages.update.config import UpdateConfig
    from stages.update.trainer import PolicyTrainer

    m = _tiny_model()
    trainer = PolicyTrainer(m, UpdateConfig(minibatch_size=4, epochs=1), temperature=1.0, needs_critic=False)
    B, P, R = 4, 3, 5
    ids = torch.randint(0, 32, (B, P + R))

    class T:  # minimal BatchTensors stand-in
        input_ids = ids
        attention_mask = torch.ones(B, P + R, dtype=torch.long)
        position_ids = torch.arange(P + R).expand(B, -1)
        prompt_len = P
        response_mask = torch.ones(B, R)
        old_logprobs = torch.zeros(B, R)

    before = [p.detach().clone() for p in m.parameters()]
    adv = torch.full((B, R), float("nan"))
    stats = trainer.update(T, CreditResult(advantages=adv, granularity="token", credit=adv), seed=0)
    assert stats["skipped_steps"] == 1 and stats["skipped.nonfinite_loss"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    stats = trainer.update(T, CreditResult(advantages=torch.ones(B, R), granularity="token",
                                           credit=torch.ones(B)), seed=0)
    assert stats["skipped_steps"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
