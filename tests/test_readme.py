"""Every Python block of the README runs as written, offline: each block on its own (it must define what it uses),
with the downloads swapped out — ``pretrained=True`` becomes ``False``; Hugging Face ``from_pretrained(name)`` builds
the class from its default config with random weights, except for the vision-language models, whose 7B language
models do not fit a test: those become a small random model of the same class (a CLIP tower at the same 336 px and
patch 14, so the same 576 image tokens), and their processors small ones built in memory — and ``calibrate``/``heal``
given a small search budget (what they return is tested elsewhere; here, that the README's calls are right)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import tokenmerge_patch as tm

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def _offline(source: str) -> str:
    return source.replace("pretrained=True", "pretrained=False")


@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """``from_pretrained`` without the network: the class built from its default config (random weights)."""
    transformers = pytest.importorskip("transformers")

    def build(cls, name, *args, **kwargs):
        config_class = getattr(cls, "config_class", None)
        if config_class is None:  # processors, tokenizers: the README block must build those itself
            raise RuntimeError(f"a README block calls {cls.__name__}.from_pretrained({name!r}): it needs the network")
        if cls.__name__.startswith("Llava"):
            return cls(_small_llava_config(transformers))
        return cls(config_class())

    def processor(cls, name, *args, **kwargs):
        if not name.startswith("llava-hf/"):
            raise RuntimeError(f"a README block calls {cls.__name__}.from_pretrained({name!r}): it needs the network")
        from test_vlm import llava_processor

        return llava_processor(size=336, patch=14)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(build))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", classmethod(processor))
    calibrate, heal = tm.calibrate, getattr(tm, "heal", None)

    def quick_calibrate(model, data, **kwargs):
        return calibrate(model, data, **{**kwargs, "max_block_runs": 24, "images": 8, "progress": False})

    monkeypatch.setattr(tm, "calibrate", quick_calibrate)
    if heal is not None:
        monkeypatch.setattr(tm, "heal", lambda model, data, **kwargs: heal(model, data, **{**kwargs, "steps": 2}))


def _small_llava_config(transformers):
    """LLaVA-1.5's tower geometry (336 px, patch 14: 576 image tokens, the second-to-last layer, no class token) with
    small widths, and a small Llama; the image token id is the in-memory tokenizer's."""
    from test_vlm import IMAGE

    vision = transformers.CLIPVisionConfig(
        image_size=336, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
    )
    text = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100
    )
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE)


def test_the_readme_has_python_blocks() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 5 and all("tokenmerge_patch" in block for block in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs_as_written(index: int, no_downloads: None, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks may write files (plan.json)
    torch.manual_seed(0)
    source = _offline(python_blocks()[index])
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(source, f"README.md python block {index}", "exec"), namespace)
