"""The pure reduction functions against hand-computed results."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmerge_patch.reduce import (
    class_attention,
    cosine_assignment,
    group_weighted_mean,
    kept_count,
    reduce_tokens,
    size_weighted_mean,
    split_crucial,
)


def qk_for_scores(scores: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """One head, d=1: q_cls = 1 and k_i = log(s_i) give softmax(q k^T) = s / sum(s) exactly."""
    k = torch.tensor(scores).log().view(1, 1, -1, 1)
    q = torch.ones_like(k)
    return q, k


def test_kept_count_is_ceil_without_float_noise() -> None:
    assert [kept_count(196, 0.7), kept_count(138, 0.7), kept_count(97, 0.7)] == [138, 97, 68]
    assert kept_count(140, 0.7) == 98  # 0.7 * 140 = 98.00000000000001 in floats
    assert kept_count(10, 1e-6) == 1
    assert kept_count(10, 1.0) == 10


def test_class_attention_is_head_mean_of_softmax_row() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    expected = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1)[:, :, 0, :].mean(1)
    torch.testing.assert_close(class_attention(q, k, 0.5), expected)
    assert torch.allclose(class_attention(q, k, 0.5).sum(-1), torch.ones(2))


def test_split_crucial_orders() -> None:
    keep, rest = split_crucial(torch.tensor([[0.1, 0.4, 0.2, 0.3, 0.0]]), 2)
    assert keep.tolist() == [[1, 3]]
    assert rest.tolist() == [[2, 0, 4]]


def test_weighted_merge_by_hand() -> None:
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    tokens = torch.tensor([[[1.0, 0.1], [0.1, 1.0], [3.0, 0.0]]])
    assignment = cosine_assignment(tokens, targets)
    assert assignment.tolist() == [[0, 1, 0]]
    # members: the two targets, then the three tokens; group = own slot for targets, assignment for tokens
    members = torch.cat([targets, tokens], dim=1)
    group = torch.cat([torch.tensor([[0, 1]]), assignment], dim=1)
    merged = group_weighted_mean(members, torch.tensor([[0.4, 0.2, 0.1, 0.1, 0.2]]), group, 2)
    first = (0.4 * torch.tensor([1.0, 0.0]) + 0.1 * torch.tensor([1.0, 0.1]) + 0.2 * torch.tensor([3.0, 0.0])) / 0.7
    second = (0.2 * torch.tensor([0.0, 1.0]) + 0.1 * torch.tensor([0.1, 1.0])) / 0.3
    torch.testing.assert_close(merged[0], torch.stack([first, second]))


CLS = [1.0, -0.3]
PATCHES = [[1.0, 0.0], [0.0, 1.0], [1.0, -0.2], [0.1, 1.0]]
SCORES = [0.2, 0.4, 0.2, 0.1, 0.1]  # class column first


def hand_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.tensor([[CLS, *PATCHES]])
    q, k = qk_for_scores(SCORES)
    return x, q, k


def test_merge_one_image_by_hand() -> None:
    x, q, k = hand_example()
    out = reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=0.5, trace_source=True)
    # crucial: patches 0 (score 0.4) and 1 (0.2); patch 2 (1, -0.2) is closest to patch 0 by cosine
    # (0.98 vs -0.20), patch 3 (0.1, 1) to patch 1 (0.995 vs 0.10). The class token is no target.
    m0 = (0.4 * torch.tensor([1.0, 0.0]) + 0.1 * torch.tensor([1.0, -0.2])) / 0.5
    m1 = (0.2 * torch.tensor([0.0, 1.0]) + 0.1 * torch.tensor([0.1, 1.0])) / 0.3
    torch.testing.assert_close(out.x[0], torch.stack([torch.tensor(CLS), m0, m1]))
    assert out.sizes.tolist() == [[1.0, 2.0, 2.0]]
    assert out.source.tolist() == [[1, 2, 1, 2]]
    assert out.keep_index.tolist() == [[0, 1]]


def test_keep_norm_by_hand() -> None:
    x, q, k = hand_example()
    out = reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=0.5, keep_norm=True)
    # the same groups and directions as eq. 4; each merged token is as long as its longest member:
    # group 0 holds (1, 0) and (1, -0.2) (norm 1.0198), group 1 holds (0, 1) and (0.1, 1) (norm 1.005)
    m0 = (0.4 * torch.tensor([1.0, 0.0]) + 0.1 * torch.tensor([1.0, -0.2])) / 0.5
    m1 = (0.2 * torch.tensor([0.0, 1.0]) + 0.1 * torch.tensor([0.1, 1.0])) / 0.3
    m0, m1 = m0 * (1.04**0.5 / m0.norm()), m1 * (1.01**0.5 / m1.norm())
    torch.testing.assert_close(out.x[0], torch.stack([torch.tensor(CLS), m0, m1]))
    assert out.sizes.tolist() == [[1.0, 2.0, 2.0]]
    plain = reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=0.5)
    assert not torch.allclose(out.x, plain.x)
    # keeping 3: patch 3 joins patch 1; patches 0 and 2, merged with nothing, keep exactly their own vectors
    alone = reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=0.75, keep_norm=True)
    assert alone.sizes.tolist() == [[1.0, 1.0, 2.0, 1.0]]
    torch.testing.assert_close(alone.x[0, [1, 3]], x[0, [1, 3]])


def test_merge_into_cls_by_hand() -> None:
    x, q, k = hand_example()
    out = reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=0.5, merge_into_cls=True, trace_source=True)
    # patch 2 (1, -0.2) is now closest to the class token (1, -0.3): cosine 0.996 vs 0.981 for patch 0;
    # the class token's weight is its attention to itself, 0.2
    cls = (0.2 * torch.tensor(CLS) + 0.1 * torch.tensor([1.0, -0.2])) / 0.3
    m1 = (0.2 * torch.tensor([0.0, 1.0]) + 0.1 * torch.tensor([0.1, 1.0])) / 0.3
    torch.testing.assert_close(out.x[0], torch.stack([cls, torch.tensor([1.0, 0.0]), m1]))
    assert out.sizes.tolist() == [[2.0, 1.0, 2.0]]
    assert out.source.tolist() == [[1, 2, 0, 2]]


def test_drop_one_image_by_hand() -> None:
    x, q, k = hand_example()
    out = reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=0.5, method="drop", trace_source=True)
    torch.testing.assert_close(out.x[0], torch.tensor([CLS, PATCHES[0], PATCHES[1]]))
    assert out.sizes.tolist() == [[1.0, 1.0, 1.0]]
    assert out.source.tolist() == [[1, 2, -1, -1]]


def test_keep_rate_one_is_identity() -> None:
    x, q, k = hand_example()
    out = reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=1.0)
    assert out.x is x


@pytest.mark.parametrize("num_prefix", [1, 2, 5])
def test_batched_equals_per_image(num_prefix: int) -> None:
    torch.manual_seed(3)
    x, q, k = (
        torch.randn(4, num_prefix + 20, 8),
        torch.randn(4, 2, num_prefix + 20, 4),
        torch.randn(4, 2, num_prefix + 20, 4),
    )
    batched = reduce_tokens(x, q, k, 0.5, num_prefix=num_prefix, keep_rate=0.6, trace_source=True)
    for b in range(4):
        single = reduce_tokens(
            x[b : b + 1], q[b : b + 1], k[b : b + 1], 0.5, num_prefix=num_prefix, keep_rate=0.6, trace_source=True
        )
        torch.testing.assert_close(batched.x[b], single.x[0])
        assert torch.equal(batched.source[b], single.source[0])
    assert batched.x.shape == (4, num_prefix + math.ceil(0.6 * 20), 8)
    # prefix tokens untouched; sizes account for every patch
    torch.testing.assert_close(batched.x[:, :num_prefix], x[:, :num_prefix])
    assert batched.sizes[:, num_prefix:].sum(1).tolist() == [20.0] * 4


def test_merged_token_is_a_convex_combination_of_its_sources() -> None:
    """Each merged token is the score-weighted mean of exactly the patches its source map assigns to it."""
    torch.manual_seed(4)
    x, q, k = torch.randn(2, 1 + 30, 6), torch.randn(2, 3, 31, 4), torch.randn(2, 3, 31, 4)
    out = reduce_tokens(x, q, k, 0.5, num_prefix=1, keep_rate=0.3, trace_source=True)
    scores = class_attention(q, k, 0.5)
    for b in range(2):
        for token in range(1, out.x.shape[1]):
            members = (out.source[b] == token).nonzero().flatten() + 1
            w = scores[b, members]
            torch.testing.assert_close(out.x[b, token], (w[:, None] * x[b, members]).sum(0) / w.sum())
            assert out.sizes[b, token] == len(members)


def test_gradients_flow_to_tokens_queries_and_keys() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 11, 4, requires_grad=True)
    q = torch.randn(2, 2, 11, 3, requires_grad=True)
    k = torch.randn(2, 2, 11, 3, requires_grad=True)
    reduce_tokens(x, q, k, 0.5, num_prefix=1, keep_rate=0.5).x.square().sum().backward()
    for tensor in (x, q, k):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_size_weighted_mean() -> None:
    tokens = torch.tensor([[[1.0], [4.0]]])
    assert size_weighted_mean(tokens, torch.tensor([[3.0, 1.0]])).item() == pytest.approx(7 / 4)


def test_bad_method() -> None:
    x, q, k = hand_example()
    with pytest.raises(ValueError, match="method must be one of"):
        reduce_tokens(x, q, k, 1.0, num_prefix=1, keep_rate=0.5, method="prune")
