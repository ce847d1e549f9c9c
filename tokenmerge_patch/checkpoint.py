"""Load a timm ``VisionTransformer`` from a folder holding ``model.safetensors`` and ``config.json``.

``config.json`` holds the ``VisionTransformer`` keyword arguments, with ``act_layer`` by name, plus keys
that are not model arguments: ``attn_head_dim`` (attention heads wider or narrower than
``embed_dim // num_heads``) and the input normalisation ``mean`` / ``std``. This is the format of
``../shared/models/vit_mnist_tiny``.

>>> import json, tempfile, pathlib, torch, timm
>>> from safetensors.torch import save_file
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> config = dict(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2,
...               act_layer="relu", attn_head_dim=6, mean=[0.5], std=[0.25])
>>> source = build_model(config)
>>> save_file(source.state_dict(), folder / "model.safetensors")
>>> _ = (folder / "config.json").write_text(json.dumps(config))
>>> loaded = load_checkpoint(folder)
>>> loaded.model.blocks[0].attn.head_dim, loaded.mean, loaded.std
(6, (0.5,), (0.25,))
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn

NOT_MODEL_KWARGS = ("attn_head_dim", "mean", "std")


@dataclass
class Checkpoint:
    """A loaded model and the normalisation its inputs expect."""

    model: VisionTransformer
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: dict


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """Whether the model hub answers within ``timeout`` seconds (timm's own offline failure takes ~50 s of
    retries), so ``pretrained=True`` is only tried where it can work. ``HF_HUB_OFFLINE=1`` means no."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def build_model(config: dict) -> VisionTransformer:
    """A ``VisionTransformer`` from a checkpoint config (random weights).

    ``attn_head_dim`` is applied by replacing each block's attention with a plain timm ``Attention`` of
    that head width (timm's ``attn_layer`` rejects a ``functools.partial``), so the model pickles like
    any timm model.
    """
    kwargs = {key: value for key, value in config.items() if key not in NOT_MODEL_KWARGS}
    model = VisionTransformer(**kwargs)
    head_dim = config.get("attn_head_dim")
    if head_dim is not None:
        accepted = inspect.signature(Attention.__init__).parameters  # older timm lacks scale_norm
        if "attn_head_dim" not in accepted:
            raise ValueError("this checkpoint needs attn_head_dim, which this timm's Attention lacks (timm >= 1.0.16)")
        for block in model.blocks:
            old = block.attn
            options = dict(
                num_heads=old.num_heads,
                attn_head_dim=int(head_dim),
                qkv_bias=old.qkv.bias is not None,
                qk_norm=not isinstance(old.q_norm, nn.Identity),
                scale_norm=not isinstance(getattr(old, "norm", nn.Identity()), nn.Identity),
                proj_bias=old.proj.bias is not None,
                attn_drop=old.attn_drop.p,
                proj_drop=old.proj_drop.p,
                norm_layer=type(old.q_norm) if not isinstance(old.q_norm, nn.Identity) else nn.LayerNorm,
            )
            block.attn = Attention(model.embed_dim, **{k: v for k, v in options.items() if k in accepted})
    return model


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Build the model described by ``folder/config.json`` and load ``folder/model.safetensors`` strictly."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint folder {folder} has no {name}")
    config = json.loads((folder / "config.json").read_text())
    model = build_model(config)
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    in_chans = int(config.get("in_chans", 3))
    mean = tuple(float(v) for v in config.get("mean", (0.5,) * in_chans))
    std = tuple(float(v) for v in config.get("std", (0.5,) * in_chans))
    return Checkpoint(model.eval(), mean, std, config)
