"""SCRIBE (Jiang and Ferraro 2026; stages/credit/methods/skills.py): a step fitting a high-value
prototype gets more credit than one fitting a low-value prototype at equal outcome (and the
credit follows the values when they are swapped); an empty library or alpha=0 is GRPO exactly;
the seeded spherical k-means against a plain reference; the library's merge rules; the library
persists in the policy checkpoint (save -> restore -> identical credit); config errors."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.group_stats import pooled_turn_normalize
from stages.credit.methods.skills import SkillLibrary, spherical_kmeans
from stages.credit.registry import build_method, get_method_class
from stages.schema import Batch
from tests.test_turn_level import make_batch

H = 8


def _scribe(**kw):
    cls = get_method_class("scribe")
    m = cls(cls.Config(**kw))
    m.build_helpers(H, seed=0)
    return m


def _grpo(t):
    return build_method(get_method_class("grpo").Config())(t, Batch([]), CreditContext())


def _basis(i: int) -> torch.Tensor:
    return torch.eye(H)[i]


def _hidden_from(t, directions: "list[list[int]]", noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    """(B, R, H) hidden states whose step k of row b points along basis vector directions[b][k]
    (plus noise); observation tokens get an unrelated large vector a correct method never reads."""
    g = torch.Generator().manual_seed(seed)
    B, R = t.response_mask.shape
    hid = torch.randn(B, R, H, generator=g) * noise
    d = torch.tensor([row + [0] * (int(t.turn_ids.max()) + 1 - len(row)) for row in directions])
    onehot = torch.eye(H)[d.gather(1, t.turn_ids.clamp(min=0))]  # (B, R, H)
    pol = (t.response_mask != 0).unsqueeze(-1).float()
    return hid + onehot * pol + (1 - pol) * 10.0 * _basis(H - 1)


def _set_library(m, protos: "list[int]", values: "list[float]") -> None:
    lib: SkillLibrary = m.library
    with torch.no_grad():
        for i, (p, v) in enumerate(zip(protos, values)):
            lib.prototypes[i] = _basis(p)
            lib.value[i] = v
        lib.size.fill_(len(protos))


# rows of one group, all with the same outcome (GRPO's advantage 0 on every token); two turns each
ROWS = [(0, [2, 3], 1.0), (0, [3, 2], 1.0), (0, [2, 2], 1.0), (0, [3, 3], 1.0)]
DIRS = [[0, 1], [1, 0], [0, 2], [2, 1]]  # step directions: skill 0, skill 1, or skill 2 (in no prototype)


def _step_credit(res, t, b, k):
    return float(res.advantages[b][t.turn_ids[b] == k].unique().squeeze())


def test_a_step_fitting_a_high_value_prototype_gets_more_credit_and_follows_the_values():
    batch, t, _ = make_batch(ROWS)
    ctx = CreditContext(hidden_states=_hidden_from(t, DIRS))
    m = _scribe(fit_threshold=0.5)
    _set_library(m, [0, 1], [1.0, 0.2])
    res = m(t, batch, ctx)
    assert torch.count_nonzero(_grpo(t).advantages) == 0  # equal outcomes: GRPO credits nothing
    a = {(b, k): _step_credit(res, t, b, k) for b in range(4) for k in range(2)}
    skill0 = [a[(0, 0)], a[(1, 1)], a[(2, 0)]]
    skill1 = [a[(0, 1)], a[(1, 0)], a[(3, 1)]]
    assert min(skill0) > max(skill1) + 0.5  # every high-value step above every low-value one
    assert a[(2, 1)] == 0.0 and a[(3, 0)] == 0.0  # fit no prototype: only the outcome advantage (0)
    assert res.stats["matched_step_fraction"] == pytest.approx(6 / 8)
    # the credit is the group-normalised fit x value of the matched steps
    fit = torch.tensor([[res.credit[b, k] for k in range(2)] for b in range(4)])
    assert float(fit.sum()) == pytest.approx(0.0, abs=1e-5)
    # swap the prototype values: the credit follows (skill 1 now above skill 0, by the same margin)
    _set_library(m, [0, 1], [0.2, 1.0])
    swapped = m(t, batch, ctx)
    b0 = {(b, k): _step_credit(swapped, t, b, k) for b in range(4) for k in range(2)}
    assert min(b0[(0, 1)], b0[(1, 0)], b0[(3, 1)]) > max(b0[(0, 0)], b0[(1, 1)], b0[(2, 0)]) + 0.5
    assert b0[(0, 0)] == pytest.approx(a[(0, 1)], abs=0.05)
    # the router matches by content, not by slot: the same prototypes in another order, same credit
    _set_library(m, [1, 0], [1.0, 0.2])
    assert torch.allclose(m(t, batch, ctx).advantages, swapped.advantages, atol=1e-6)
    assert res.overhead.wall_seconds > 0


def test_differential_vs_grpo_empty_library_and_alpha_zero_are_grpo_exactly():
    rows = [(g, [2, 2, 3], float(w)) for g in range(2) for w in (0, 1, 1, 0)]
    batch, t, _ = make_batch(rows)
    dirs = [[i % 3, (i + 1) % 3, 0] for i in range(len(rows))]
    ctx = CreditContext(hidden_states=_hidden_from(t, dirs))
    grpo = _grpo(t).advantages
    empty = _scribe()(t, batch, ctx)
    assert torch.equal(empty.advantages, grpo) and empty.stats["library_size"] == 0
    m0 = _scribe(alpha=0.0)
    _set_library(m0, [0, 1, 2], [1.0, 0.0, 0.5])
    assert torch.equal(m0(t, batch, ctx).advantages, grpo)
    # alpha > 0: SCRIBE - GRPO is alpha times the group-normalised fit x value, on each step's tokens
    m = _scribe(alpha=0.5)
    _set_library(m, [0, 1, 2], [1.0, 0.0, 0.5])
    feats = ctx.hidden_states
    K = 3
    step_x = torch.stack([torch.stack([feats[b][t.turn_ids[b] == k].mean(0) for k in range(K)]) for b in range(len(rows))])
    step_x = torch.nn.functional.normalize(step_x, dim=-1)
    fit, j = (step_x @ torch.eye(H)[:3].T).max(-1)
    r = fit * torch.tensor([1.0, 0.0, 0.5])[j]
    everywhere = torch.ones_like(r, dtype=torch.bool)
    for by_std in (False, True):  # centred on the group's pooled mean (default), or turn-level GRPO
        m.cfg.step_norm_by_std = by_std
        res = m(t, batch, ctx)
        z = pooled_turn_normalize(r, everywhere, t.index, 1e-6, scale=by_std)
        if not by_std:  # the reference by hand: r minus the mean of its group's 12 steps
            g = torch.tensor([0] * 4 + [1] * 4)
            assert torch.allclose(z, r - torch.stack([r[g == q].mean() for q in (0, 1)])[g].unsqueeze(1), atol=1e-6)
        diff = res.advantages - grpo
        for b in range(len(rows)):
            for k in range(K):
                assert torch.allclose(diff[b][t.turn_ids[b] == k], 0.5 * z[b, k], atol=1e-5)
        assert not torch.allclose(res.advantages, grpo)


def _reference_kmeans(x, m, iters, seed):
    """Plain-Python spherical k-means with the same farthest-point init, loops over points."""
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    while len(chosen) < m:
        best = [max(float(x[i] @ x[c]) for c in chosen) for i in range(n)]
        chosen.append(min(range(n), key=lambda i: best[i]))
    c = [x[i].clone() for i in chosen]
    assign = [max(range(m), key=lambda q: float(x[i] @ c[q])) for i in range(n)]
    for _ in range(iters):
        for q in range(m):
            pts = [x[i] for i in range(n) if assign[i] == q]
            if pts:
                s = torch.stack(pts).sum(0)
                c[q] = s / s.norm()
        new = [max(range(m), key=lambda q: float(x[i] @ c[q])) for i in range(n)]
        if new == assign:
            break
        assign = new
    return torch.stack(c), torch.tensor(assign)


def test_spherical_kmeans_matches_a_reference_and_recovers_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.nn.functional.normalize(torch.randn(3, H, generator=g), dim=-1)
    truth = torch.arange(30) % 3
    x = torch.nn.functional.normalize(centres[truth] + 0.15 * torch.randn(30, H, generator=g), dim=-1)
    c, a = spherical_kmeans(x, 3, 20, seed=4)
    rc, ra = _reference_kmeans(x, 3, 20, seed=4)
    assert torch.equal(a, ra) and torch.allclose(c, rc, atol=1e-5)
    # each found cluster is one true cluster, and its centroid is close to the true centre
    for q in range(3):
        assert truth[a == q].unique().numel() == 1
        assert float(c[q] @ centres[truth[a == q][0]]) > 0.95
    # overlapping data, more clusters: still the reference
    y = torch.nn.functional.normalize(torch.randn(25, H, generator=g), dim=-1)
    c2, a2 = spherical_kmeans(y, 5, 10, seed=2)
    rc2, ra2 = _reference_kmeans(y, 5, 10, seed=2)
    assert torch.equal(a2, ra2) and torch.allclose(c2, rc2, atol=1e-5)
    # coincident points give no duplicate centroids; fewer points than clusters
    same = _basis(0).repeat(4, 1)
    assert spherical_kmeans(same, 3, 5, seed=0)[0].shape[0] == 1
    assert spherical_kmeans(y[:2], 5, 5, seed=0)[0].shape[0] == 2


def test_library_merge_prototypes_from_successes_values_from_all_matched_steps():
    lib = SkillLibrary(H, capacity=3, centered=False)  # raw geometry: exact expectations below
    e = torch.eye(H)
    feats = torch.stack([e[0], e[0], e[1], e[1], e[2]])
    returns = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    success = torch.tensor([True, False, True, True, False])
    out = lib.merge(feats, returns, success, threshold=0.5, ema=0.5, iters=10, seed=0)
    protos, values = lib.active()
    assert out["skills_library_size"] == 2 == protos.shape[0]  # e2 only in a failure: no prototype
    v = {int(p.argmax()): float(val) for p, val in zip(protos, values)}
    assert v == {0: pytest.approx(0.5), 1: pytest.approx(1.0)}  # skill 0 matched by a success and a failure
    # a second batch: EMA of the values (0.5 -> 0.5 * 0.5 + 0.5 * 0 = 0.25), a new skill fills a free slot
    out = lib.merge(torch.stack([e[0], e[3]]), torch.tensor([0.0, 1.0]), torch.tensor([False, True]), 0.5, 0.5, 10, 0)
    protos, values = lib.active()
    v = {int(p.argmax()): float(val) for p, val in zip(protos, values)}
    assert v == {0: pytest.approx(0.25), 1: pytest.approx(1.0), 3: pytest.approx(1.0)}
    assert int(lib.updates) == 2 and out["skills_new_prototypes"] == 1
    # full: a new unmatched success is dropped, the size stays bounded
    out = lib.merge(e[4:5], torch.tensor([1.0]), torch.tensor([True]), 0.5, 0.5, 10, 0)
    assert int(lib.size) == 3 and out["skills_dropped_success_steps"] == 1


def test_centring_makes_the_router_tell_actions_apart_when_hidden_states_share_a_direction():
    """A policy's hidden states share a dominant direction: raw mean-pooled features of two different
    actions have cosine ~1, so without centring every prototype fits every step. With the library's
    running mean subtracted, each step fits its own skill's prototype."""
    g = torch.Generator().manual_seed(0)
    common = 10.0 * _basis(7)
    skill = torch.tensor([0, 1] * 6)
    raw = common + torch.eye(H)[skill] + 0.05 * torch.randn(12, H, generator=g)
    returns, success = skill.float(), torch.ones(12, dtype=torch.bool)
    for centered, expect_apart in ((False, False), (True, True)):
        lib = SkillLibrary(H, capacity=4, centered=centered)
        lib.merge(raw, returns, success, threshold=0.5, ema=0.5, iters=10, seed=0)
        x = lib.embed(raw)
        protos, values = lib.active()
        if not expect_apart:
            assert float((x @ protos.T).min()) > 0.98  # every step fits every prototype: no routing
        else:
            fit, j = (x @ protos.T).max(-1)
            assert bool((fit > 0.9).all()) and float((x[skill == 0] @ x[skill == 1].T).max()) < 0
            assert torch.equal(values[j], returns)  # each step routed to its skill's prototype and value


def test_the_library_persists_in_the_policy_checkpoint(tmp_path):
    from stages.rollout.config import ModelConfig
    from stages.rollout.policy import build_tiny_policy
    from stages.update.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model, _ = build_tiny_policy(ModelConfig(hidden_size=H, intermediate_size=16, num_layers=1, num_heads=2,
                                             num_kv_heads=1, vocab_size=300), ["go left\nok\n"] * 4)
    rows = [(g, [2, 3], float(w)) for g in range(2) for w in (0, 1, 1, 0)]
    batch, t, _ = make_batch(rows)
    ctx = CreditContext(hidden_states=_hidden_from(t, [[i % 4, (i + 2) % 4] for i in range(len(rows))]))
    m = _scribe(num_prototypes=4)
    m.update_helpers(m(t, batch, ctx), seed=0)  # the first batch fills the library
    trained = m(t, batch, ctx)
    assert trained.stats["library_size"] > 0 and trained.stats["matched_step_fraction"] > 0
    path = save_checkpoint(tmp_path, "iter_0000", model, helpers=m.helper_modules())
    fresh = _scribe(num_prototypes=4)
    assert not torch.equal(fresh(t, batch, ctx).advantages, trained.advantages)
    load_checkpoint(path, model, None, fresh.helper_modules())
    assert torch.equal(fresh(t, batch, ctx).advantages, trained.advantages)
    bare = save_checkpoint(tmp_path, "bare", model)
    with pytest.raises(CheckpointError, match="helper.skills.safetensors"):
        load_checkpoint(bare, model, None, fresh.helper_modules())


def test_config_errors_are_one_line_and_bad_inputs_are_refused():
    from flows.config import ConfigError, load_config, validate

    cls = get_method_class("scribe")
    for kw, key in [({"num_prototypes": 0}, "num_prototypes"), ({"fit_threshold": 1.5}, "fit_threshold"),
                    ({"ema": 0.0}, "ema"), ({"alpha": -1.0}, "alpha"), ({"kmeans_iters": 0}, "kmeans_iters")]:
        with pytest.raises(Exception) as e:
            cls(cls.Config(**kw))
        assert key in str(e.value) and "\n" not in str(e.value)
    b, t, _ = make_batch([(0, [2], 1.0), (0, [2], 0.0)])
    with pytest.raises(ValueError, match="credit method 'scribe': ctx.hidden_states must be"):
        _scribe()(t, b, CreditContext(hidden_states=torch.zeros(2, 1, H)))
    with pytest.raises(ConfigError, match="group"):
        validate(load_config(["env=bifurcation", "credit=scribe", "rollout.group_size=1"]))
