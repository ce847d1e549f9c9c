"""Dense outputs after a reduction: give every original patch the features of the token that holds it.

A patched model tracks, for each original patch, which token holds it (the *source map*, ``[B, N0]``, part of
the record that travels with the tokens; ``-1`` for a patch ``method="drop"`` discarded). :func:`unmerge` turns
reduced tokens ``[B, P + K, C]`` back into the full sequence ``[B, P + N0, C]``, so the patch tokens fill the
image grid again and can be reshaped to feature maps, upsampled, or fed to a segmentation or depth head.

This is what the patched timm ``forward_intermediates(output_fmt="NCHW")`` (so ``features_only=True`` models
and ``get_intermediate_layers(reshape=True)``) and the patched Hugging Face ``Dinov2Backbone`` return.

``patch(..., dense=True)`` keeps the full resolution instead: the residual stream keeps every patch, and each block
from the first reduction on computes on merged tokens and hands its update back to every patch of a group
(:func:`merge_groups`, then :func:`spread_groups`; the way token merging for Stable Diffusion keeps a full-resolution
image). Its outputs are the unpatched shapes with a feature vector of their own per patch; nothing needs unmerging.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .records import LayerRecord, TokenRecord, groups_of, record_of
from .reduce import gather_tokens, group_sum

__all__ = ["unmerge"]


def unmerge(
    tokens: Tensor,
    source: TokenRecord | LayerRecord | Tensor | None = None,
    *,
    num_prefix: int | None = None,
    dropped: float = 0.0,
) -> Tensor:
    """The full token sequence ``[B, P + N0, C]`` from reduced tokens ``[B, P + K, C]``: the ``P`` prefix tokens as
    they are, then for each original patch (in the patch embedding's order) the features of the token holding it.

    - ``method="merge"`` / ``"bipartite"``: every patch gets its merged token (all patches of a group get the same
      features); with ``merge_into_cls=True`` a patch the class token absorbed gets the class token.
    - ``method="fuse"`` (EViT): the patches fused into the extra token get that token, as it is (a score-weighted
      *sum*, not a mean, so its scale differs from a patch token's).
    - ``method="drop"``: a discarded patch has no token; it gets ``dropped`` in every channel (default ``0.0``;
      ``float("nan")`` marks them). Which patches were dropped: ``source < 0``.

    Gradients flow from the unmerged tokens back to the reduced ones (a row gather). The outputs of a ``dense=True``
    model hold every patch already: they are returned as they are.

    How to unmerge any token output of a patched model: pass the tensor the model returned, e.g.
    ``unmerge(model.forward_features(x))`` (timm) or ``unmerge(model(x).last_hidden_state)`` (Hugging Face): the
    record it carries says which token holds which patch. A copy (``.detach()``, ``.clone()``, ``.to()``, slicing)
    drops that record; then pass it explicitly, e.g. ``unmerge(features.detach(), record_of(features))`` or, for
    the last forward, ``unmerge(y, tm.reduction_trace(model)[layer], num_prefix=1)`` with ``layer`` the last
    reducing block that ``y`` came through. Tokens from before the first reducing block need no unmerging. Per-token
    layers (norms, MLPs, linear heads) commute with unmerging, so ``unmerge(norm(y)) == norm(unmerge(y))``; patch
    tokens to an image: ``unmerge(y)[:, P:].reshape(B, H, W, C)`` for an ``H x W`` patch grid.

    Args:
        tokens: ``[B, P + K, C]`` reduced tokens, prefix tokens first (what a patched block, ``forward_features`` or
            a Hugging Face encoder returned).
        source: where the source map comes from: ``None`` (read the record ``tokens`` carry), such a record
            (:func:`tokenmerge_patch.records.record_of`), a :class:`~tokenmerge_patch.LayerRecord` of
            :func:`~tokenmerge_patch.reduction_trace`, or the ``[B, N0]`` long source map itself (values index
            ``tokens``; ``-1``: dropped).
        num_prefix: number of prefix tokens ``P`` (class, distillation, registers); read from the record when
            ``source`` is ``None`` or a record, needed for a ``LayerRecord`` or a bare source map.
        dropped: the value of every channel of a dropped patch.

    Returns:
        ``[B, P + N0, C]``, same dtype and device as ``tokens``; not tagged with a record (each token is one patch
        again, so pooling it plainly is right).

    Raises:
        ValueError: no source map to be found (tokens without a record), ``num_prefix`` missing, or shapes that do
            not fit.

    Example:
        >>> import timm, torch, tokenmerge_patch as tm
        >>> model = tm.patch(timm.create_model("vit_tiny_patch16_224", img_size=64), keep_rate=0.5)
        >>> tokens = model.forward_features(torch.randn(2, 3, 64, 64))
        >>> tokens.shape, tm.unmerge(tokens).shape  # 16 patches (4 x 4) in 2 tokens, back to 16
        (torch.Size([2, 3, 192]), torch.Size([2, 17, 192]))
        >>> source = tm.reduction_trace(model)[9].source  # the last reducing block: the source map of `tokens`
        >>> bool((tm.unmerge(tokens)[:, 1:] == tm.unmerge(tokens, source, num_prefix=1)[:, 1:]).all())
        True
    """
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        raise ValueError(f"tokens must be a [B, N, C] tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}")
    if source is None and record_of(tokens) is None and groups_of(tokens) is not None:
        return tokens  # the full-resolution stream of a dense=True model: every patch is its own token already
    record = record_of(tokens) if source is None else source if isinstance(source, tuple) else None
    if source is None and record is None:
        raise ValueError(
            "these tokens carry no merge record (they come from before the first reducing block, from an unpatched "
            "model, or from a copy such as .detach(), .clone(), .to() or a slice, which drops it): pass the tensor the "
            "patched model returned itself, or its source map (tokenmerge_patch.reduction_trace(model)[layer]) "
            "with num_prefix="
        )
    if record is not None:
        source_map = record[1]
        trace = record[3]
        if source_map is None:
            raise ValueError("this merge record has no source map (it was made without source tracking)")
        if num_prefix is None and trace:  # the first reducing block got the prefix and every patch
            num_prefix = int(trace[0][1]) - source_map.shape[1]
    elif isinstance(source, LayerRecord):
        source_map = source.source
    elif isinstance(source, Tensor):
        source_map = source
    else:
        raise ValueError(
            f"source must be a merge record, a LayerRecord or a [B, N0] long tensor, got {type(source).__name__}"
        )
    if num_prefix is None:
        raise ValueError("give num_prefix= (class, distillation and register tokens) with a LayerRecord or source map")
    if source_map is None or source_map.dim() != 2 or source_map.dtype != torch.long:
        raise ValueError("the source map must be a [B, N0] long tensor (see tokenmerge_patch.reduction_trace)")
    if source_map.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"the source map is for {source_map.shape[0]} images but tokens has {tokens.shape[0]}: pass the source map "
            "of the same forward"
        )
    if not 0 <= num_prefix < tokens.shape[1]:
        raise ValueError(f"num_prefix={num_prefix} does not fit tokens of shape {tuple(tokens.shape)}")
    source_map = source_map.to(tokens.device)
    # a map from another forward or layer could point past the tokens (into the next image's rows): refuse it
    checking = not (torch.compiler.is_compiling() or torch.jit.is_tracing())
    if checking and source_map.numel() and int(source_map.max()) >= tokens.shape[1]:
        raise ValueError(
            f"the source map points at token {int(source_map.max())} but tokens has {tokens.shape[1]}: pass the "
            "source map of the layer these tokens come from"
        )
    return _spread(tokens, source_map, num_prefix, dropped)


def _spread(tokens: Tensor, source: Tensor, num_prefix: int, dropped: float = 0.0) -> Tensor:
    """``[B, P + K, C]`` -> ``[B, P + N0, C]``: the prefix rows, then for each patch the row of ``tokens`` that
    ``source`` names (``dropped`` where it is ``-1``); no checks."""
    patches = gather_tokens(tokens, source.clamp(min=0))  # [B, N0, C]
    patches = patches.masked_fill((source < 0).unsqueeze(-1), dropped)
    return torch.cat([tokens[:, :num_prefix], patches], dim=1)


def merge_groups(x: Tensor, groups: TokenRecord | None, num_prefix: int) -> Tensor:
    """The tokens a ``dense=True`` block computes on: the full-resolution stream ``x`` ``[B, P + N0, C]`` merged by
    ``groups`` (the record of the merged tokens, see :func:`~tokenmerge_patch.records.groups_of`) into
    ``[B, P + K, C]``: the prefix tokens as they are, then for each merged token the mean of its patches' current
    features (a patch ``method="drop"`` discarded belongs to none). ``x`` itself before any reduction.

    The plain mean: every patch of a group gets the group's update back (:func:`spread_groups`), and the mean is the
    one input that update is computed from for all of them alike. Merging the spread update gives it back exactly.

    >>> x = torch.tensor([[[9.0], [1.0], [2.0], [4.0]]])  # a class token and three patches
    >>> groups = (torch.tensor([[1.0, 2.0, 1.0]]), torch.tensor([[1, 2, 1]]), True, (), None)
    >>> merge_groups(x, groups, num_prefix=1)  # patches 0 and 2 form token 1, patch 1 is token 2
    tensor([[[9.0000],
             [2.5000],
             [2.0000]]])
    """
    if groups is None or not groups[2]:
        return x
    sizes = groups[0]
    count = sizes.shape[1]
    sums = group_sum(x, _rows(groups[1], num_prefix, count), count + 1)  # dropped patches: row `count`, cut off
    return sums[:, :count] / sizes.to(x.dtype).unsqueeze(-1)


def spread_groups(update: Tensor, groups: TokenRecord | None, num_prefix: int) -> Tensor:
    """A ``dense=True`` block's update of the merged tokens ``[B, P + K, C]`` handed back to the full resolution
    ``[B, P + N0, C]``: each patch gets its group's update (a patch ``method="drop"`` discarded gets none: it keeps
    its features from then on). ``update`` itself before any reduction.

    >>> groups = (torch.tensor([[1.0, 2.0, 1.0]]), torch.tensor([[1, 2, 1]]), True, (), None)
    >>> spread_groups(torch.tensor([[[0.5], [1.0], [3.0]]]), groups, num_prefix=1).flatten().tolist()
    [0.5, 1.0, 3.0, 1.0]
    """
    if groups is None or not groups[2]:
        return update
    count = update.shape[1]
    padded = torch.cat([update, update.new_zeros(update.shape[0], 1, update.shape[2])], dim=1)  # row `count`: zeros
    return gather_tokens(padded, _rows(groups[1], num_prefix, count))


def _rows(source: Tensor, num_prefix: int, dropped: int) -> Tensor:
    """``[B, P + N0]``: for every row of the full-resolution stream, its merged token (the prefix tokens their own;
    a dropped patch, ``-1`` in ``source``, the row ``dropped``). One index for the whole stream, so merging and
    spreading are one ``index_add`` and one ``index_select`` each."""
    prefix = torch.arange(num_prefix, device=source.device).expand(source.shape[0], -1)
    return torch.cat([prefix, torch.where(source < 0, dropped, source)], dim=1)


def intermediate_map(patches: Tensor, prefix: Tensor, records: dict, grid: tuple[int, int]) -> Tensor:
    """One intermediate of a dense call (``forward_intermediates``) as an ``[B, C, H, W]`` map: its patch tokens are
    unmerged by the record of the block output they were cut from (found by the storage they share, see
    :meth:`~tokenmerge_patch.patch.TokenMergeState.collecting`); tokens from before the first reduction already
    fill the grid."""
    height, width = grid
    record = records.get(patches.untyped_storage().data_ptr())
    if record is not None and record[0].shape[1] == prefix.shape[1] + patches.shape[1]:
        patches = unmerge(torch.cat([prefix, patches], dim=1), record, num_prefix=prefix.shape[1])[:, prefix.shape[1] :]
    elif patches.shape[1] != height * width:
        raise ValueError(
            f"an intermediate has {patches.shape[1]} patch tokens for a grid of {height * width} patches and no "
            "merge record to unmerge them by (a forward hook replaced a block's output?): its tokens no longer form "
            "an image grid; use output_fmt='NLC', earlier indices, or unpatch"
        )
    return patches.reshape(patches.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()
