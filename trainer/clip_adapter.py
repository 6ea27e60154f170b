"""The ONLY module that touches open_clip internals.

Prompt learning re-runs open_clip's towers with extra inputs (learned context in the text embeddings,
prompt tokens between the vision blocks), so it needs the towers' pieces: token and positional embeddings,
the text transformer with its causal mask, ``ln_final``, pooling and ``text_projection``; the vision tower's
patch embedding (``_embeds``), ``transformer.resblocks``, ``_pool`` (``ln_post`` + pooling) and ``proj``.
These internals drift between open_clip releases (``text_global_pool`` changed its return type and
signature between 2.24, 2.32 and 3.x; the text path dropped its NLD->LND permute), so the supported minor
version is pinned here and in ``pyproject.toml``, and ``tests/test_prompts.py`` checks both paths against
``encode_text`` / ``encode_image``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import UserError

# open_clip models are dynamic nn.Modules (attributes resolved through __getattr__): typed as Any here
ClipModel = Any

SUPPORTED_OPEN_CLIP = "3.3"
SUPPORTED_TEXT_POOLING = ("argmax", "eos")


def check_supported(clip: ClipModel) -> None:
    """Refuse models whose towers this adapter cannot re-run, naming the setting."""
    import open_clip

    version = open_clip.__version__
    if not version.startswith(SUPPORTED_OPEN_CLIP + "."):
        raise UserError(
            f"open_clip_torch {version} is installed but flatprompt supports {SUPPORTED_OPEN_CLIP}.x only: "
            f"pip install 'open_clip_torch~={SUPPORTED_OPEN_CLIP}.0'"
        )
    if not hasattr(clip, "token_embedding"):
        raise UserError(
            f"{type(clip).__name__} has a custom (e.g. Hugging Face) text tower, which prompt learning does not "
            "support: use a model with open_clip's own text transformer"
        )
    pool = getattr(clip, "text_pool_type", "argmax")
    if pool not in SUPPORTED_TEXT_POOLING:
        raise UserError(
            f"text_pool_type '{pool}' is not supported: use a model with {SUPPORTED_TEXT_POOLING}"
        )
    visual = clip.visual
    if type(visual).__name__ != "VisionTransformer":
        raise UserError(
            f"vision tower {type(visual).__name__} is not supported: visual prompts need open_clip's ViT"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UserError("attentional pooling in the vision tower is not supported: use a 'tok'/'avg' ViT")


# --------------------------------------------------------------------------------------------- activation


def activation_name(clip: ClipModel) -> str:
    """The MLP activation the towers were built with: ``"quick_gelu"`` (OpenAI's x * sigmoid(1.702 x)),
    ``"gelu"`` or another module's class name, read from the first vision block (open_clip builds both
    towers with the same ``act_layer``)."""
    from open_clip.transformer import QuickGELU

    act = clip.visual.transformer.resblocks[0].mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu"
    return type(act).__name__


# --------------------------------------------------------------------------------------------- text


def text_width(clip: ClipModel) -> int:
    return int(clip.token_embedding.weight.shape[1])


def context_length(clip: ClipModel) -> int:
    return int(clip.context_length)


def embed_tokens(clip: ClipModel, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids [N, L] -> word embeddings [N, L, W] (no positions yet)."""
    return clip.token_embedding(tokens)


def encode_text_embeds(clip: ClipModel, embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` from word embeddings [N, L, W]; ``tokens`` [N, L] only locate the EOT.

    Returns unnormalised features [N, E].
    """
    cast_dtype = clip.transformer.get_cast_dtype()
    x = embeds.to(cast_dtype) + clip.positional_embedding.to(cast_dtype)  # [N, L, W]
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)  # [N, L, W]
    if clip.text_pool_type == "argmax":
        idx = tokens.argmax(dim=-1)  # the EOT id is the largest id in CLIP's vocabulary
    else:  # "eos"
        idx = (tokens == clip.text_eos_id).int().argmax(dim=-1)
    x = x[torch.arange(x.shape[0], device=x.device), idx]  # [N, W]
    proj = clip.text_projection
    if proj is None:
        return x
    if isinstance(proj, nn.Linear):
        return proj(x)
    return x @ proj  # [N, E]


# --------------------------------------------------------------------------------------------- vision


def vision_width(clip: ClipModel) -> int:
    return int(clip.visual.class_embedding.shape[0])


def vision_layers(clip: ClipModel) -> int:
    return len(clip.visual.transformer.resblocks)


def patch_size(clip: ClipModel) -> int:
    ps = clip.visual.patch_size
    return int(ps[0] if isinstance(ps, (tuple, list)) else ps)


def encode_image_prompted(
    clip: ClipModel, images: torch.Tensor, prompts: Sequence[torch.Tensor | None] | None
) -> torch.Tensor:
    """open_clip's ViT forward with visual prompt tokens (VPT), unnormalised features [N, E].

    ``prompts[i]`` ([Lp, D] or None) is inserted before block i: the tokens after the first N0 = 1 + patches
    (the previous block's prompt outputs, if any) are replaced by it (deep VPT replace semantics); with
    ``prompts[i] is None`` the sequence passes unchanged. Prompt outputs are dropped before pooling, so
    'avg' pooling never averages prompt tokens. With no prompts this is exactly ``clip.encode_image``.
    """
    visual = clip.visual
    x = visual._embeds(images)  # [N, N0, D], after ln_pre
    n0 = x.shape[1]
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)  # NLD -> LND
    for i, block in enumerate(blocks):
        p = prompts[i] if prompts is not None and i < len(prompts) else None
        if p is not None:
            if batch_first:
                x = torch.cat([x[:, :n0], p.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
            else:
                x = torch.cat([x[:n0], p.to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)], dim=0)
        x = block(x)
    if not batch_first:
        x = x.transpose(0, 1)  # LND -> NLD
    x = x[:, :n0]  # drop prompt outputs before pooling
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


# --------------------------------------------------------------------------------------------- logits


def logit_scale_and_bias(clip: ClipModel) -> tuple[float, float | None]:
    """The model's own exp(logit_scale) (and logit_bias, SigLIP-style models), as plain floats."""
    scale = float(clip.logit_scale.detach().exp().reshape(-1)[0])
    bias = getattr(clip, "logit_bias", None)
    return scale, (float(bias.detach().reshape(-1)[0]) if bias is not None else None)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
