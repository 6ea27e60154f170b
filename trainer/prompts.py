"""Prompt learners on a frozen open_clip CLIP.

- Text context, CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022,
  arXiv 2109.01134): M context vectors shared by every class, class name at the end:
  ``[SOS] v_1 .. v_M name . [EOS]``. Implemented as "tokenise ``X X .. X {name}.`` and overwrite positions
  1..M of the word embeddings with ``ctx``" (a position mask + ``torch.where``), which equals CoOp's
  prefix | ctx | suffix concatenation and is the very graph ``export`` bakes, so new class names embed with
  the learned context later.
- Visual prompts, VPT (Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv 2203.12119): Lp tokens appended
  after the patch tokens, shallow (before block 0) or deep (before every block, replacing the previous
  prompt outputs), dropped before pooling.

Only ``ctx`` and the visual prompts require grad; the CLIP weights stay frozen and in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypedDict

import torch
from torch import nn

from trainer import clip_adapter as ca
from trainer.errors import UserError
from trainer.models import LoadedClip

Tokenizer = Callable[[list[str]], torch.Tensor]
PLACEHOLDER = "X"
ZERO_SHOT_TEMPLATE = "a photo of a {}."


class VisualPrompts(nn.Module):
    """Lp prompt tokens per prompted block: one set (shallow) or one per block (deep).

    Init: VPT's xavier-uniform bound sqrt(6 / (3 * patch^2 + D)).
    """

    def __init__(self, num_layers: int, width: int, length: int, deep: bool, patch: int) -> None:
        super().__init__()
        if length <= 0:
            raise ValueError(f"visual prompt length must be > 0, got {length}")
        self.num_layers = num_layers
        self.deep = deep
        n_sets = num_layers if deep else 1
        bound = math.sqrt(6.0 / (3 * patch * patch + width))
        self.prompts = nn.Parameter(torch.empty(n_sets, length, width).uniform_(-bound, bound))  # [S, Lp, D]

    def per_layer(self) -> list[torch.Tensor | None]:
        if self.deep:
            return list(self.prompts.unbind(0))
        return [self.prompts[0]] + [None] * (self.num_layers - 1)


class PromptSpec(TypedDict):
    """:meth:`PromptedCLIP.spec`: the prompt constructor arguments (stored in the checkpoint)."""

    n_ctx: int
    ctx_init: str | None
    vpt_length: int
    vpt_deep: bool
    template: str


class PromptedCLIP(nn.Module):
    """A frozen open_clip CLIP with a learned text context and optional visual prompts.

    Args:
        clip: the open_clip model (frozen here).
        tokenizer: open_clip tokenizer for ``clip`` (``open_clip.get_tokenizer(name)``).
        n_ctx: number of learned context vectors M; 0 keeps the text side hand-written (``template``).
        ctx_init: a phrase whose word embeddings initialise ctx (right-aligned, zeros before it when M is
            larger than the phrase, as GCSCoOp does); None draws N(0, 0.02^2) (CoOp's random init).
        vpt_length: visual prompt tokens Lp per prompted block; 0 disables visual prompts.
        vpt_deep: prompts before every block (deep) or only the first (shallow).
        template: only with n_ctx = 0, the hand-written prompt template.
    """

    class_tokens: torch.Tensor  # [C, L] prompt token ids of ``class_names`` (a buffer)

    def __init__(
        self,
        clip: ca.ClipModel,
        tokenizer: Tokenizer,
        n_ctx: int = 4,
        ctx_init: str | None = "a photo of a",
        vpt_length: int = 0,
        vpt_deep: bool = True,
        template: str = ZERO_SHOT_TEMPLATE,
    ) -> None:
        super().__init__()
        ca.check_supported(clip)
        if n_ctx < 0 or vpt_length < 0:
            raise UserError(f"n_ctx ({n_ctx}) and vpt_length ({vpt_length}) must be >= 0")
        self.clip: ca.ClipModel = clip.eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.vpt_length = vpt_length
        self.vpt_deep = vpt_deep
        self.template = " ".join([PLACEHOLDER] * n_ctx + ["{}."]) if n_ctx > 0 else template
        if "{}" not in self.template:
            raise UserError(f"prompt template '{template}' has no '{{}}' for the class name")
        width = ca.text_width(clip)
        self.ctx: nn.Parameter | None = None
        if n_ctx > 0:
            self.ctx = nn.Parameter(self._init_ctx(n_ctx, width, ctx_init))  # [M, W]
        self.visual_prompts: VisualPrompts | None = None
        if vpt_length > 0:
            self.visual_prompts = VisualPrompts(
                ca.vision_layers(clip), ca.vision_width(clip), vpt_length, vpt_deep, ca.patch_size(clip)
            )
        scale, bias = ca.logit_scale_and_bias(clip)
        self.logit_scale = scale
        self.logit_bias = bias
        self.class_names: list[str] = []
        self.register_buffer("class_tokens", torch.zeros(0, ca.context_length(clip), dtype=torch.long))

    @classmethod
    def zero_shot(cls, loaded: LoadedClip, template: str = ZERO_SHOT_TEMPLATE) -> PromptedCLIP:
        import open_clip

        return cls(loaded.model, open_clip.get_tokenizer(loaded.identity.name), n_ctx=0, template=template)

    # ------------------------------------------------------------------------------------------ setup

    def _init_ctx(self, n_ctx: int, width: int, phrase: str | None) -> torch.Tensor:
        if not phrase:
            return torch.randn(n_ctx, width) * 0.02
        tokens = self.tokenizer([phrase])[0]
        n_words = int((tokens > 0).sum()) - 2  # minus SOT and EOT
        if n_words > n_ctx:
            raise UserError(f"ctx_init '{phrase}' has {n_words} tokens but n_ctx is {n_ctx}: raise n_ctx")
        with torch.no_grad():
            emb = ca.embed_tokens(self.clip, tokens[None].to(self._device()))[0, 1 : 1 + n_words]  # [n, W]
        ctx = torch.zeros(n_ctx, width)
        ctx[n_ctx - n_words :] = emb.float().cpu()
        return ctx

    def _device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def tokenize(self, names: list[str]) -> torch.Tensor:
        """Token ids [N, L] of the prompt text for each class name."""
        if not names:
            raise UserError("the class list is empty: give at least one class name")
        return self.tokenizer([self.template.format(n) for n in names])

    def set_class_names(self, names: list[str]) -> None:
        """The classes ``forward`` scores; their prompt tokens are cached as a buffer."""
        self.class_names = list(names)
        self.class_tokens = self.tokenize(self.class_names).to(self.class_tokens.device)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if set(own) != set(state):
            raise UserError(
                f"prompt parameters in the checkpoint {sorted(state)} do not match the model's {sorted(own)}: "
                "build the model with the checkpoint's prompt settings"
            )
        with torch.no_grad():
            for n, p in own.items():
                if p.shape != state[n].shape:
                    raise UserError(
                        f"prompt parameter {n} has shape {tuple(state[n].shape)}, expected {tuple(p.shape)}"
                    )
                p.copy_(state[n])

    def spec(self) -> PromptSpec:
        """The constructor arguments (beside clip and tokenizer) that rebuild this module."""
        return {
            "n_ctx": self.n_ctx,
            "ctx_init": self.ctx_init,
            "vpt_length": self.vpt_length,
            "vpt_deep": self.vpt_deep,
            "template": self.template,
        }

    def train(self, mode: bool = True) -> PromptedCLIP:
        super().train(mode)
        self.clip.eval()  # frozen towers always run in eval mode (no dropout / patch dropout)
        return self

    # ------------------------------------------------------------------------------------------ towers

    def encode_token_ids(self, tokens: torch.Tensor, learned: bool = True) -> torch.Tensor:
        """Prompt token ids [N, L] -> normalised text features [N, E], learned ctx at positions 1..M.

        ``learned=False`` runs the plain frozen text tower over the tokens as they are (the hand-written
        path, used for KgCoOp's reference features).
        """
        x = ca.embed_tokens(self.clip, tokens)  # [N, L, W]
        if self.ctx is not None and learned:
            length = tokens.shape[1]
            pos = torch.arange(length, device=tokens.device)
            mask = ((pos >= 1) & (pos <= self.n_ctx)).view(1, length, 1)  # [1, L, 1]
            ctx_full = torch.cat(
                [
                    self.ctx.new_zeros(1, self.ctx.shape[1]),
                    self.ctx,
                    self.ctx.new_zeros(length - 1 - self.n_ctx, self.ctx.shape[1]),
                ]
            )  # [L, W]
            x = torch.where(mask, ctx_full.unsqueeze(0).to(x.dtype), x)
        return ca.normalize(ca.encode_text_embeds(self.clip, x, tokens))

    def encode_names(self, names: list[str]) -> torch.Tensor:
        return self.encode_token_ids(self.tokenize(names).to(self._device()))

    def encode_template(self, names: list[str], template: str) -> torch.Tensor:
        """Normalised features [N, E] of the hand-written ``template.format(name)`` through the frozen text
        tower, without the learned context (what zero-shot CLIP uses)."""
        if "{}" not in template:
            raise UserError(f"prompt template '{template}' has no '{{}}' for the class name")
        if not names:
            raise UserError("the class list is empty: give at least one class name")
        tokens = self.tokenizer([template.format(n) for n in names]).to(self._device())
        return self.encode_token_ids(tokens, learned=False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        prompts = self.visual_prompts.per_layer() if self.visual_prompts is not None else None
        return ca.normalize(ca.encode_image_prompted(self.clip, images, prompts))

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        out = self.logit_scale * image_features @ text_features.t()  # [B, C]
        return out + self.logit_bias if self.logit_bias is not None else out

    def forward(
        self, images: torch.Tensor, return_text: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] over ``class_names`` (set with :meth:`set_class_names`); with ``return_text``, also
        the class text features [C, E] they were computed with (for a text-side regulariser such as
        KgCoOp's, so that it shares this forward's graph instead of running the text tower again)."""
        if self.class_tokens.shape[0] == 0:
            raise RuntimeError("set_class_names() must be called before forward()")
        image = self.encode_image(images)  # [B, E]
        text = self.encode_token_ids(self.class_tokens)  # [C, E]
        logits = self.logits(image, text)
        return (logits, text) if return_text else logits
