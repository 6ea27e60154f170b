"""Helpers for the export / runtime tests: a tiny prompted model, its checkpoint, cached tokenizer files.

No downloads: the tiny open_clip config of ``tests/fixtures/tiny-clip.json`` with seeded random weights,
saved to a local file so that ``trainer.checkpoint.load_prompted`` rebuilds the very same CLIP.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_CONFIG = FIXTURES / "tiny-clip.json"
TINY_NAME = "tiny-clip"
CLASS_NAMES = ["cat", "dog", "snow leopard", "red fox", "Crème brûlée", "koala"]
CLASS_COUNTS = [500, 120, 40, 12, 5, 1]


def cache_dir() -> Path:
    path = Path(os.environ.get("FLATPROMPT_TEST_CACHE", "/tmp/flatprompt-test-cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def tokenizer_files(target: Path) -> tuple[Path, Path]:
    """``tokenizer.json`` and ``pretokenizer.json`` in ``target`` (built once per machine, then copied)."""
    from export.tokenizer import write_pretokenizer_json, write_tokenizer_json

    out = []
    for name, writer in (
        ("tokenizer.json", write_tokenizer_json),
        ("pretokenizer.json", write_pretokenizer_json),
    ):
        cached = cache_dir() / f"export-test-{name}"
        if not cached.is_file():
            tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
            writer(tmp)
            tmp.replace(cached)
        shutil.copyfile(cached, target / name)
        out.append(target / name)
    return out[0], out[1]


def tiny_weights(path: Path, seed: int = 0) -> Path:
    """Seeded random tiny-clip weights saved as a plain open_clip state dict."""
    import open_clip
    import torch

    from trainer.models import register_model_config

    register_model_config(TINY_CONFIG)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_NAME, pretrained=None)
    with torch.no_grad():  # a learned-looking scale, not open_clip's init value
        model.logit_scale.fill_(4.0)
    torch.save(model.state_dict(), path)
    return path


def load_tiny(weights: Path) -> Any:
    from trainer.models import load_clip

    # a plain weights file does not record its activation: the tiny weights were built with GELU
    return load_clip(TINY_NAME, pretrained=str(weights), config_path=str(TINY_CONFIG), quick_gelu=False)


def make_prompted(
    loaded: Any, seed: int = 1, n_ctx: int = 4, vpt_length: int = 2, vpt_deep: bool = True
) -> Any:
    """A PromptedCLIP with random "learned" context and visual prompts (far from their init)."""
    import open_clip
    import torch

    from trainer.prompts import PromptedCLIP

    model = PromptedCLIP(
        loaded.model,
        open_clip.get_tokenizer(TINY_NAME),
        n_ctx=n_ctx,
        ctx_init=None,
        vpt_length=vpt_length,
        vpt_deep=vpt_deep,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def write_checkpoint(path: Path, loaded: Any, model: Any, names: list[str], counts: list[int]) -> Path:
    """A ``flatprompt-run/1`` checkpoint as ``trainer.runner`` writes it (the fields the exporter reads)."""
    from trainer.checkpoint import CHECKPOINT_FORMAT, atomic_torch_save

    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "config": {"model": {"name": TINY_NAME}},
            "identity": loaded.identity.to_dict(),
            "prompt_spec": model.spec(),
            "prompt_state": model.trainable_state_dict(),
            "class_names": names,
            "class_counts": counts,
            "novel_class_names": [],
            "epoch": 3,
        },
        path,
    )
    return path


def variant_config(
    tmp: Path,
    name: str,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    top: dict[str, Any] | None = None,
) -> Path:
    """A copy of the tiny config under another name with some settings changed (unsupported-model tests)."""
    import json

    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["text_cfg"].update(text or {})
    cfg["vision_cfg"].update(vision or {})
    cfg.update(top or {})
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path
