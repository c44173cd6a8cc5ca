"""Stage-5 loss registry (issue 14): ``update.loss`` values derive from it, the trainer looks a
loss up by name (a test-registered loss trains through it), and each built-in loss has its
defining property checked against a direct computation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flows.config import ConfigError, describe_config, load_config
from stages.schema import CreditResult
from stages.update.config import UpdateConfig
from stages.update.loss_registry import get_loss, loss_names, register_loss, unregister_loss
from stages.update.trainer import PolicyTrainer

EPS = 0.2


def test_registry_lists_the_builtin_losses_with_their_declarations():
    assert {"ppo", "grpo"} <= set(loss_names())
    assert get_loss("ppo").aggregation == "token-mean"
    assert get_loss("grpo").aggregation == "seq-mean-token-mean"
    assert "Schulman" in get_loss("ppo").reference and "Shao" in get_loss("grpo").reference
    with pytest.raises(KeyError, match="known losses: dpo, grpo, ppo"):
        get_loss("nosuch")


def test_unknown_loss_is_one_config_line_listing_the_registry():
    with pytest.raises(ConfigError) as info:
        load_config(["update.loss=nosuch"])
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("update.loss=nosuch: must be one of " + ", ".join(loss_names())), text


def test_registration_checks_its_declarations():
    with pytest.raises(ValueError, match="unknown needs"):
        register_loss("bad_needs", aggregation="token-mean", needs=("critic_values",))
    with pytest.raises(ValueError, match="aggregation"):
        register_loss("bad_agg", aggregation="sum")
    with pytest.raises(ValueError, match="registered twice"):
        register_loss("ppo", aggregation="token-mean")(lambda *a: None)


def _data(seed=0, B=4, R=6):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, R, generator=g, dtype=torch.float64) * 0.2
    # ratios spread over both sides of the clip range
    lp = (old + torch.linspace(-0.6, 0.6, B * R, dtype=torch.float64).reshape(B, R)).requires_grad_(True)
    adv = torch.randn(B, R, generator=g, dtype=torch.float64)
    mask = torch.ones(B, R, dtype=torch.float64)
    mask[1, 3:] = 0  # sequences of different lengths
    mask[2, 1:] = 0
    return lp, old, adv, mask


def _grad(name, lp, old, adv, mask):
    loss, _ = get_loss(name)(lp, old, adv, mask, UpdateConfig(loss=name, clip_ratio=EPS))
    (g,) = torch.autograd.grad(loss, lp)
    return loss, g


def test_ppo_clip_gradient_is_zero_outside_the_clip_range_and_minus_a_r_over_n_inside():
    lp, old, adv, mask = _data()
    _, g = _grad("ppo", lp, old, adv, mask)
    r = torch.exp(lp.detach() - old)
    # d/d logpi of -A r / N  is  -A r / N while the unclipped term is the max; the clipped term is constant
    clipped = ((adv > 0) & (r > 1 + EPS)) | ((adv < 0) & (r < 1 - EPS))
    expected = torch.where(clipped, torch.zeros_like(r), -adv * r / mask.sum()) * mask
    assert bool(clipped[mask.bool()].any()) and bool((~clipped)[mask.bool()].any())
    assert torch.allclose(g, expected, atol=1e-12)
    # positive advantages above 1+eps: no gradient, whatever the ratio
    pos_out = (adv > 0) & (r > 1 + EPS) & mask.bool()
    assert bool(pos_out.any()) and bool((g[pos_out] == 0).all())


def test_grpo_weights_each_sequence_equally_whatever_its_length():
    lp, old, adv, mask = _data(seed=1)
    loss, g = _grad("grpo", lp, old, adv, mask)
    r = torch.exp(lp.detach() - old)
    per_tok = torch.maximum(-adv * r, -adv * r.clamp(1 - EPS, 1 + EPS))
    lengths = mask.sum(-1)
    direct = ((per_tok * mask).sum(-1) / lengths).mean()
    assert float(loss.detach()) == pytest.approx(float(direct), abs=1e-12)
    clipped = ((adv > 0) & (r > 1 + EPS)) | ((adv < 0) & (r < 1 - EPS))
    expected = torch.where(clipped, torch.zeros_like(r), -adv * r / (lengths[:, None] * mask.shape[0])) * mask
    assert torch.allclose(g, expected, atol=1e-12)
    # what distinguishes it from PPO: a token of the one-token response weighs 6x one of a 6-token one
    _, g_ppo = _grad("ppo", lp, old, adv, mask)
    assert not torch.allclose(g, g_ppo)
    equal_len = torch.ones_like(mask)
    assert float(_grad("grpo", lp, old, adv, equal_len)[0].detach()) == pytest.approx(
        float(_grad("ppo", lp, old, adv, equal_len)[0].detach()))


def _tiny_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=24, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


@pytest.fixture
def likelihood_loss():
    """A test-registered loss: maximise the log-likelihood of the response (needs ref log-probs,
    only to record that the trainer provides them)."""
    calls = []

    @register_loss("test_likelihood", aggregation="token-mean", needs=("ref_logprobs",), reference="test")
    def loss(logprobs, old_logprobs, advantages, mask, cfg, ref_logprobs):
        calls.append((logprobs.detach().clone(), ref_logprobs.clone()))
        nll = -(logprobs * mask).sum() / mask.sum()
        return nll, {"test_nll": float(nll.detach())}

    yield calls
    unregister_loss("test_likelihood")


def test_a_registered_loss_is_accepted_by_the_config_and_trains_through_the_trainer(likelihood_loss):
    cfg = load_config(["update.loss=test_likelihood"])
    assert cfg["update"]["loss"] == "test_likelihood"
    assert "test_likelihood" in describe_config("update", [])
    m = _tiny_model()
    trainer = PolicyTrainer(m, UpdateConfig(loss="test_likelihood", minibatch_size=4, epochs=3, lr=1e-2),
                            temperature=1.0, needs_critic=False)
    assert trainer.reference is not None  # kept because the loss needs ref_logprobs (kl_coef is 0)
    B, P, R = 4, 3, 5
    ids = torch.randint(0, 24, (B, P + R), generator=torch.Generator().manual_seed(0))
    tensors = SimpleNamespace(input_ids=ids, attention_mask=torch.ones(B, P + R, dtype=torch.long),
                              position_ids=torch.arange(P + R).expand(B, -1), prompt_len=P,
                              response_mask=torch.ones(B, R), old_logprobs=torch.zeros(B, R))
    adv = torch.zeros(B, R)
    stats = trainer.update(tensors, CreditResult(advantages=adv, granularity="token", credit=adv), seed=0)
    assert len(likelihood_loss) == 3 and stats["skipped_steps"] == 0
    first_lp, first_ref = likelihood_loss[0]
    assert torch.allclose(first_lp, first_ref, atol=1e-6)  # the reference is the initial policy
    last_lp, last_ref = likelihood_loss[-1]
    def by_row(x):  # mini-batch rows are shuffled each epoch
        return x[x.sum(-1).argsort()]

    assert torch.allclose(by_row(last_ref), by_row(first_ref))  # frozen
    assert float(last_lp.mean()) > float(first_lp.mean())  # the trainer minimised this loss
    assert "test_nll" in stats and stats["pg_loss"] == pytest.approx(stats["test_nll"])
