"""The real pretrained ViT of ../shared (vit_mnist_tiny, 97.2 % on MNIST) on real MNIST test digits."""

from __future__ import annotations

import pytest
import torch
from tiny_models import HAS_ATTN_HEAD_DIM, MNIST_DIR, MNIST_MODEL, needs_shared

import tokenmerge_patch as tm
from tokenmerge_patch.checkpoint import load_checkpoint
from tokenmerge_patch.data import dataset_from_spec

pytestmark = [
    needs_shared,
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_ATTN_HEAD_DIM, reason="this timm's Attention has no attn_head_dim (the model needs it)"),
]
SUBSET = range(2000)  # the full 10k run is benchmarks/accuracy.py


@pytest.fixture(scope="module")
def mnist_batch():
    checkpoint = load_checkpoint(MNIST_MODEL)
    data = dataset_from_spec(
        f"mnist:{MNIST_DIR}", mean=checkpoint.mean, std=checkpoint.std, image_size=(28, 28), in_chans=1, indices=SUBSET
    )
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.stack([data[i][1] for i in range(len(data))])
    return checkpoint.model, images, labels


def predictions(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(chunk).argmax(-1) for chunk in images.split(500)])


def test_real_model_head_dim_differs_from_dim_over_heads(mnist_batch) -> None:
    model, _, _ = mnist_batch
    attn = model.blocks[0].attn
    assert attn.head_dim * attn.num_heads == 256 != model.embed_dim


def test_real_model_accuracy_unpatched_and_patched(mnist_batch) -> None:
    model, images, labels = mnist_batch
    tm.unpatch(model)
    reference = predictions(model, images)
    accuracy = (reference == labels).float().mean().item()
    assert accuracy > 0.95  # 97.2 % on all 10k digits

    tm.patch(model, layers=(1, 3, 5), keep_rate=1.0)
    assert torch.equal(predictions(model, images), reference)

    results = {}
    for method in ("merge", "drop"):
        for keep_rate in (0.7, 0.3):
            tm.patch(model, layers=(1, 3, 5), keep_rate=keep_rate, method=method)
            results[method, keep_rate] = (predictions(model, images) == labels).float().mean().item()
    tm.unpatch(model)
    # 49 -> 35 -> 25 -> 18 patches at 0.7 costs well under two points; 49 -> 15 -> 5 -> 2 at 0.3 more
    assert results["merge", 0.7] > accuracy - 0.02
    assert results["merge", 0.3] > accuracy - 0.06
    # merging keeps the information dropping throws away
    assert results["merge", 0.3] >= results["drop", 0.3]
