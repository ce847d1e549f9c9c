"""Per-forward bookkeeping that travels with the tokens.

The record of one forward is an attribute of the token tensor itself: a block, the pool or an unmerge reads
the record of the very tensor it is given, so a re-entrant call, a second forward before ``forward_head`` or
a recomputation under activation checkpointing never reads another forward's sizes. It is a plain tuple of
tensors and ints, so ``torch.save`` of a tagged tensor still loads with ``weights_only=True``::

    (sizes [B, N] float32, source [B, N0] long | None, reduced: bool, trace: ((layer, in, out, sizes, source), ...),
     positions [B, N - num_prefix] long | None)

``positions`` says, for each patch token, which row of the model's rotary position table (RoPE models: timm
``Eva``, Hugging Face DINOv3) it uses: the row of the patch it sits at (a merged token sits at its crucial
token's patch), or ``-1`` for a token with no position (EViT's fused token), which the rotary embedding leaves
unrotated, as it does prefix tokens. ``None``: no block has reduced yet, every patch token is at its own row.

With ``dense=True`` the tokens between blocks are the full-resolution stream (every patch its own row), and the record
of the merged tokens each block computes on (its *groups*: the same tuple, whose source map says which merged token
holds each patch) travels under another attribute (:func:`groups_of`): whatever reads :func:`record_of` (pools,
``unmerge``, feature maps) sees full tokens, as an unpatched model gives them.

>>> import torch
>>> x = tag(torch.zeros(1, 3, 4), (torch.tensor([[1.0, 2.0, 1.0]]), None, True, (), torch.tensor([[5, -1]])))
>>> record_sizes(record_of(x)), record_positions(record_of(x)), record_of(x.clone())
(tensor([[1., 2., 1.]]), tensor([[ 5, -1]]), None)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

TAG = "_tokenmerge_record"
GROUPS_TAG = "_tokenmerge_groups"  # dense=True: the merge groups of a full-resolution stream
TokenRecord = tuple


@dataclass
class LayerRecord:
    """What one reducing block did in a forward (all tensors detached).

    Attributes:
        tokens_in: tokens entering the block (prefix included).
        tokens_out: tokens leaving it.
        sizes: ``[B, tokens_out]`` how many original tokens each output token holds.
        source: ``[B, N0]`` for each original patch, the index of the output token holding it (-1 if
            dropped); see :func:`tokenmerge_patch.unmerge`.
    """

    tokens_in: int
    tokens_out: int
    sizes: Tensor
    source: Tensor | None


def record_of(x: Tensor) -> TokenRecord | None:
    """The record travelling with the tokens ``x`` (``None`` if they carry none)."""
    record = getattr(x, TAG, None)
    return record if isinstance(record, tuple) and len(record) == 5 else None


def tag(x: Tensor, record: TokenRecord | None) -> Tensor:
    """Attach ``record`` to ``x`` (a fresh tensor a block or norm returned) and return ``x``."""
    if record is not None:
        setattr(x, TAG, record)
    return x


def record_sizes(record: TokenRecord | None) -> Tensor | None:
    """How many patches each token holds, ``None`` when no block removed a token (every token is one patch)."""
    return None if record is None or not record[2] else record[0]


def record_positions(record: TokenRecord | None) -> Tensor | None:
    """Each patch token's row of the rotary position table (``-1``: none), ``None`` while every patch token is
    still at its own row (no block has reduced)."""
    return None if record is None else record[4]


def groups_of(x: Tensor) -> TokenRecord | None:
    """The merge groups a ``dense=True`` full-resolution stream ``x`` is computed in (a record of the merged tokens,
    see the module doc); ``None`` for anything else."""
    groups = getattr(x, GROUPS_TAG, None)
    return groups if isinstance(groups, tuple) and len(groups) == 5 else None


def tag_groups(x: Tensor, groups: TokenRecord | None) -> Tensor:
    """Attach the merge groups ``groups`` to the full-resolution stream ``x`` and return ``x``."""
    if groups is not None:
        setattr(x, GROUPS_TAG, groups)
    return x


def computed_tokens(x: Tensor) -> int:
    """How many tokens a block computes on for the tokens ``x`` it takes or returns: of a ``dense=True`` stream after a
    reduction, its merged tokens; else every token of ``x``."""
    groups = groups_of(x)
    return int(x.shape[1] if groups is None or not groups[2] else groups[0].shape[1])
