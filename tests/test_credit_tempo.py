"""TEMPO (Tran et al. 2025; survey §3.2): GRPO + branch-gated TD on the group's prefix tree."""

from __future__ import annotations

import pytest
import torch

import stages.credit.methods.prefix_tree  # noqa: F401  (registers tempo)
from stages.credit import functional as F
import stages.credit.methods  # noqa: F401  (registers the built-in methods)
from stages.credit.base import CreditContext
from stages.credit.registry import build_method, get_method_class
from stages.schema import BatchTensors


def _tensors(responses, rewards, groups):
    """BatchTensors with the given response token lists (all policy tokens), terminal rewards."""
    B = len(responses)
    R = max(len(r) for r in responses)
    ids = torch.zeros(B, R, dtype=torch.long)
    mask = torch.zeros(B, R)
    rew = torch.zeros(B, R, dtype=torch.float64)
    for i, r in enumerate(responses):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        rew[i, len(r) - 1] = rewards[i]
    attn = torch.cat([torch.ones(B, 1, dtype=torch.long), mask.long()], dim=1)
    return BatchTensors(
        input_ids=torch.cat([torch.ones(B, 1, dtype=torch.long), ids], 1), attention_mask=attn,
        position_ids=attn.cumsum(-1) - 1, prompt_len=1, response_ids=ids, response_mask=mask,
        old_logprobs=torch.zeros(B, R), entropies=torch.zeros(B, R), token_level_rewards=rew,
        episode_rewards=rew.sum(-1), index=torch.tensor(groups), turn_ids=torch.where(mask > 0, 0, -1),
        num_turns=torch.ones(B, dtype=torch.long))


def _run(t, **cfg):
    return build_method(get_method_class("tempo").Config(**cfg))(t, None, CreditContext())


def _z(t):
    return F._grpo_scalars(t.token_level_rewards, t.response_mask, t.index, 1e-6, True)


def test_no_shared_prefix_reduces_to_grpo():
    t = _tensors([[1, 2, 3], [2, 2, 3], [3, 1], [4, 4, 4, 4]], [1.0, 0.0, 1.0, 0.0], [0, 0, 0, 0])
    res = _run(t)
    expect = F.grpo(t.token_level_rewards, t.response_mask, t.index)[0]
    assert torch.allclose(res.advantages, expect)
    assert res.stats["branch_token_fraction"] == 0.0
    assert res.overhead.extra_forward_passes == 0 and res.overhead.extra_tokens == 0


def test_token_after_a_branch_point_gets_the_value_difference():
    t = _tensors([[5, 6, 7], [5, 6, 8], [5, 9, 9], [4, 4, 4]], [1.0, 0.0, 1.0, 0.0], [0, 0, 0, 0])
    z = _z(t)
    res = _run(t)
    v5 = z[:3].mean()
    v56 = z[:2].mean()
    # token 0: the root's branching is GRPO's own signal (root_td=False)
    assert torch.allclose(res.advantages[:, 0], z)
    # token 1 after node "5" (3 responses, children 6 and 9)
    assert torch.isclose(res.advantages[0, 1], z[0] + (v56 - v5))
    assert torch.isclose(res.advantages[2, 1], z[2] + (z[2] - v5))
    # token 2 after node "56" (children 7 and 8)
    assert torch.isclose(res.advantages[0, 2], z[0] + (z[0] - v56))
    assert torch.isclose(res.advantages[1, 2], z[1] + (z[1] - v56))
    # after "59" there is a single child: no TD
    assert torch.isclose(res.advantages[2, 2], z[2])
    # row 3 shares nothing: GRPO
    assert torch.allclose(res.advantages[3], z[3].expand(3))
    # root_td adds V(first child) - V(root) at token 0, V(root) = mean z = 0
    rooted = _run(t, root_td=True)
    assert torch.isclose(rooted.advantages[0, 0], z[0] + v5 - z.mean())
    # td_coef scales the correction only
    half = _run(t, td_coef=0.5)
    assert torch.isclose(half.advantages[0, 2], z[0] + 0.5 * (z[0] - v56))


def test_identical_prefixes_share_values_and_td_on_the_shared_part():
    t = _tensors([[5, 6, 7, 1, 2], [5, 6, 7, 3], [5, 6, 8, 8, 8], [9, 9]], [1.0, 0.0, 0.0, 1.0], [0, 0, 0, 0])
    res = _run(t)
    z = _z(t)
    shared = 3  # rows 0 and 1 share [5, 6, 7]
    assert torch.equal(res.values[0, :shared], res.values[1, :shared])
    td0 = res.advantages[0, :shared] - z[0]
    td1 = res.advantages[1, :shared] - z[1]
    assert torch.allclose(td0, td1)
    assert torch.allclose(res.values[0, 1], z[:3].mean())  # V(s_1): the node "5"


def test_response_ending_where_another_continues_is_a_branch_and_groups_do_not_mix():
    t = _tensors([[5, 6], [5, 6, 7], [5, 6], [5, 6, 7]], [1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1])
    res = _run(t)
    z = _z(t)
    # group 0: node "56" has children {end, 7}: token 7 of row 1 gets z1 - mean(z0, z1)
    assert torch.isclose(res.advantages[1, 2], z[1] + (z[1] - z[:2].mean()))
    assert torch.isclose(res.advantages[3, 2], z[3] + (z[3] - z[2:].mean()))
    assert torch.allclose(res.advantages[:, :2], z.unsqueeze(1).expand(4, 2))


def _reference(responses, scores, groups, root_td=False):
    """Dict-based trie, loop reference."""
    nodes = {}
    for i, r in enumerate(responses):
        sym = [x + 1 for x in r] + [0]
        for L in range(len(sym) + 1):
            key = (groups[i], tuple(sym[:L]))
            e = nodes.setdefault(key, {"rows": set(), "children": set()})
            e["rows"].add(i)
            if L < len(sym):
                e["children"].add(sym[L])
    V = {k: sum(scores[j] for j in e["rows"]) / len(e["rows"]) for k, e in nodes.items()}
    out = []
    for i, r in enumerate(responses):
        sym = [x + 1 for x in r] + [0]
        row = []
        for tpos in range(len(r)):
            k0, k1 = (groups[i], tuple(sym[:tpos])), (groups[i], tuple(sym[: tpos + 1]))
            br = len(nodes[k0]["children"]) > 1 and (root_td or tpos > 0)
            row.append(scores[i] + (V[k1] - V[k0] if br else 0.0))
        out.append(row)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("root_td", [False, True])
def test_matches_a_loop_trie_reference_on_random_groups(seed, root_td):
    g = torch.Generator().manual_seed(seed)
    B = 24
    responses = [torch.randint(0, 3, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(B)]
    groups = torch.randint(0, 4, (B,), generator=g).tolist()
    rewards = torch.randint(0, 2, (B,), generator=g).double().tolist()
    t = _tensors(responses, rewards, groups)
    res = _run(t, root_td=root_td)
    z = _z(t).tolist()
    ref = _reference(responses, z, groups, root_td)
    for i, r in enumerate(responses):
        assert torch.allclose(res.advantages[i, : len(r)], torch.tensor(ref[i], dtype=res.advantages.dtype), atol=1e-9)
        assert torch.all(res.advantages[i, len(r):] == 0)


def test_registry_entry():
    cls = get_method_class("tempo")
    assert cls.granularity == "token" and cls.needs == frozenset()
