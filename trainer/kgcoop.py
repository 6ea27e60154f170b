"""KgCoOp's knowledge-guided regulariser, a loss term that keeps the learned class text features near the
hand-written ones.

H. Yao, R. Zhang, C. Xu, "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization", CVPR 2023,
arXiv 2303.13283 (htyao89/KgCoOp ``trainers/kgcoop.py``): the training loss is
CE + lambda * (1 - mean_c cos(t_c, t_c^hand)), where t_c is class c's text feature through the learned
context, t_c^hand the frozen text tower's feature of the hand-written prompt (one template per dataset,
"a photo of a {}." for most), normalised, computed once; the mean runs over the training classes. lambda is
8.0 in every base-to-novel script of the repository (``scripts/base2new_train.sh``: ``WEIGHT=8.0``; the
code's own default ``TRAINER.COOP.W`` is 1.0). The paper writes the squared distance ||t - t^hand||^2,
which is 2 (1 - cos) for unit vectors; the code's 1 - cos is what is reproduced here.

The term depends on the text context only, and is part of the loss the training step's closure computes, so
every optimizer (SGD, SAM, GCSAM, GNM) sees it: SAM's ascent direction and GCSAM's cosine rule include its
gradient, GNM evaluates it at the perturbed point.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.prompts import PromptedCLIP

__all__ = ["KGCOOP_WEIGHT", "KgCoOpRegulariser", "build_kg_regulariser"]

KGCOOP_WEIGHT = 8.0  # lambda of KgCoOp's base-to-novel scripts (WEIGHT=8.0)
_COS_EPS = 1e-7  # KgCoOp: torch.nn.CosineSimilarity(dim=1, eps=1e-07)


class KgCoOpRegulariser(nn.Module):
    """``weight * (1 - mean_c cos(t_c, reference_c))`` for class text features ``t`` [C, E].

    Args:
        reference: the hand-written text features [C, E] of the training classes, in the order of the logits'
            classes (normalised here; stored as a buffer, so it follows ``.to(device)``).
        weight: lambda >= 0 (KgCoOp: 8.0).
    """

    reference: Tensor

    def __init__(self, reference: Tensor, weight: float = KGCOOP_WEIGHT) -> None:
        super().__init__()
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ValueError(f"KgCoOp weight must be a finite number >= 0, got {weight!r}")
        if reference.ndim != 2 or reference.shape[0] == 0:
            raise ValueError(
                f"reference must be [classes, dim] with at least one class, got {list(reference.shape)}"
            )
        self.weight = float(weight)
        self.register_buffer("reference", F.normalize(reference.detach().float(), dim=-1))  # [C, E]

    def distance(self, text_features: Tensor) -> Tensor:
        """1 - mean_c cos(t_c, reference_c), a scalar in [0, 2]; 0 when the features equal the reference."""
        if text_features.shape != self.reference.shape:
            raise ValueError(
                f"text features {list(text_features.shape)} do not match the reference {list(self.reference.shape)}: "
                "the regulariser was built for other classes"
            )
        cos = F.cosine_similarity(text_features.float(), self.reference, dim=-1, eps=_COS_EPS)  # [C]
        return 1.0 - cos.mean()

    def forward(self, text_features: Tensor) -> Tensor:
        return self.weight * self.distance(text_features)

    def extra_repr(self) -> str:
        return f"classes={self.reference.shape[0]}, weight={self.weight}"


def build_kg_regulariser(
    model: PromptedCLIP, class_names: list[str], template: str, weight: float
) -> KgCoOpRegulariser | None:
    """KgCoOp's term for ``model`` trained on ``class_names`` (None when ``weight`` is 0): the reference is the
    frozen text tower over ``template.format(name)``, computed once, in fp32, without gradients."""
    if weight == 0:
        return None
    with torch.no_grad():
        reference = model.encode_template(class_names, template).float()  # [C, E]
    return KgCoOpRegulariser(reference, weight).to(reference.device)
