"""GCSAM: gradient-constrained sharpness-aware minimization (GCSCoOp), two passes per step.

Paper: "Generalizable Prompt Learning via Gradient Constrained Sharpness-Aware Minimization", arXiv:2309.07866
(GCSCoOp; journal version IEEE TMM 2024, doi:10.1109/TMM.2024.3521702). Reference code: llcllc1997/GCSCoOp
``Dassl.gcscoop.pytorch/dassl/optim/gcsam.py``.

Name clash: "GCSAM" is also used for *Gradient Centralized SAM* (arXiv:2501.11584), an unrelated method. This
module implements the GCSCoOp optimizer only.

The SAM gradient g1 (flatness) is used only while it agrees with the ERM gradient g0 (loss value); on conflict
the step falls back to g0, and in between it takes g1 projected on the direction of g0 + g1::

    pass 1:  g0 = grad L_B(theta);  eps = rho * g0 / (||g0|| + 1e-12)    # global norm, as in SAM
             theta_old <- theta;  theta <- theta + eps;  keep g0
    pass 2:  g1 = grad L_B(theta + eps)
    per tensor k (granularity "tensor", the reference) or once over all tensors ("global"):
        c = <g1, g0> / (||g1|| ||g0||),   u = (g1 + g0) / ||g1 + g0||
        beta1 > 0:   beta1 < c < beta2 -> g = <g1, u> u;   c <= beta1 -> g = g0;   c >= beta2 -> g = g1
        beta1 <= 0:  c < beta2 -> g = <g1, u> u;           else g = g1
    theta <- theta_old (exact copy);  base_step(theta, g)

Limiting cases: rho = 0 gives g1 = g0, c = 1 and the plain base step; beta1 <= 0 with beta2 <= -1 is SAM;
beta1 >= 1 is the base step at theta (after two passes).

Numerics (the reference divides by the norms unguarded): each norm is floored at 1e-12, so a zero gradient gives
c = 0 instead of NaN; c is clamped to [-1, 1] so rounding cannot leave the SAM limit; when g1 = -g0 the
projection is 0 instead of 0/0; a non-finite c (an fp16 overflow in g0) selects g1, the gradient the AMP scaler
has checked.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from trainer.optim.base import NORM_EPS, BaseOptimizerFactory, SharpnessOptimizer, check_hyperparameter

__all__ = [
    "GCSAM",
    "GCSAM_BETA1",
    "GCSAM_BETA2",
    "GCSAM_GRANULARITIES",
    "GCSAM_GRANULARITY",
    "GCSAM_RHO",
    "Granularity",
    "constrained_gradient",
]

Granularity = Literal["tensor", "global"]
GCSAM_GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)
GCSAM_RHO = 0.1
"""Default radius (GCSCoOp README example; the paper's value is unconfirmed)."""
GCSAM_BETA1 = 0.5
"""Default lower cosine bound (GCSCoOp "LOWBOUND")."""
GCSAM_BETA2 = 0.8
"""Default upper cosine bound (GCSCoOp "UPBOUND")."""
GCSAM_GRANULARITY: Granularity = "tensor"
"""Default place the cosine is taken: per tensor, as the reference."""


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    # sum over tensors of <a_k, b_k>, accumulated in at least fp32 on a's first device
    dev = a[0].device
    parts = [
        (x.to(torch.promote_types(x.dtype, torch.float32)) * y).sum().to(dev)
        for x, y in zip(a, b, strict=True)
    ]
    return torch.stack(parts).sum()


@torch.no_grad()
def constrained_gradient(g1: list[Tensor], g0: list[Tensor], beta1: float, beta2: float) -> list[Tensor]:
    """GCSCoOp's constrained gradient for the concatenation of the tensors in ``g1`` / ``g0`` (one cosine).

    Pass one tensor per call for the per-tensor rule. Returns new tensors shaped like ``g1``. Pure function.
    """
    dot10 = _dot(g1, g0)
    n1 = _dot(g1, g1).sqrt().clamp_min(NORM_EPS)
    n0 = _dot(g0, g0).sqrt().clamp_min(NORM_EPS)
    c = (dot10 / (n1 * n0)).clamp(-1.0, 1.0)  # NaN stays NaN and selects g1 below
    z = [a + b for a, b in zip(g1, g0, strict=True)]  # g1 + g0
    # <g1, u> u with u = z / ||z||  ==  (<g1, z> / ||z||^2) z; floor ||z|| so g1 = -g0 gives 0, not 0/0
    coef = _dot(g1, z) / _dot(z, z).clamp_min(NORM_EPS**2)
    if beta1 > 0:
        in_band = (c > beta1) & (c < beta2)
        use_g0 = c <= beta1
    else:
        in_band = c < beta2
        use_g0 = torch.zeros_like(in_band)
    out = []
    for a, b, zk in zip(g1, g0, z, strict=True):
        proj = (coef.to(zk.device) * zk).to(a.dtype)
        # torch.where picks g0 / g1 bit for bit, so the limiting cases are exact
        out.append(
            torch.where(in_band.to(a.device), proj, torch.where(use_g0.to(a.device), b.to(a.dtype), a))
        )
    return out


class GCSAM(SharpnessOptimizer):
    """Gradient-constrained SAM (GCSCoOp) around an injected base optimizer.

    ``first_step`` is SAM's ascent and keeps the unscaled g0; ``restore`` puts theta back and replaces ``p.grad``
    (which must hold the *unscaled* g1 by then) with the constrained gradient. Because that gradient mixes two
    local gradients, ``local_final_grad`` is True: under DDP the engine runs both backwards without sync and
    all-reduces the final ``p.grad`` after ``restore()``, as GSAM does.

    Args:
        params: tensors or param-group dicts to optimize (a group may set its own ``rho``).
        base_optimizer: optimizer class (or factory) built as ``base_optimizer(param_groups, **base_kwargs)``.
        rho: radius of the ascent step, >= 0 (:data:`GCSAM_RHO`, 0.1; GCSCoOp's scripts pass 0.1 in the README and 8.0 in
            ``run.sh``, the paper's value is unconfirmed: tune it).
        beta1: lower cosine bound ("LOWBOUND", :data:`GCSAM_BETA1` 0.5): at or below it g0 is used.
        beta2: upper cosine bound ("UPBOUND", :data:`GCSAM_BETA2` 0.8): at or above it g1 is used.
        granularity: "tensor" (one cosine per tensor, the reference) or "global" (one over all tensors).
        **base_kwargs: forwarded to the base optimizer (``lr``, ``momentum``, ``weight_decay``...).
    """

    passes: ClassVar[int] = 2
    perturb_before_forward: ClassVar[bool] = False
    local_final_grad: ClassVar[bool] = True

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: BaseOptimizerFactory,
        rho: float = GCSAM_RHO,
        beta1: float = GCSAM_BETA1,
        beta2: float = GCSAM_BETA2,
        granularity: str = GCSAM_GRANULARITY,
        **base_kwargs: Any,
    ) -> None:
        check_hyperparameter("rho", rho, low=0.0)
        # cosines live in [-1, 1]; values outside are the documented limiting cases, so any finite number goes
        self.beta1 = check_hyperparameter("beta1", beta1)
        self.beta2 = check_hyperparameter("beta2", beta2)
        if granularity not in GCSAM_GRANULARITIES:
            raise ValueError(f"granularity must be one of {GCSAM_GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        super().__init__(params, base_optimizer, {"rho": rho}, **base_kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scale: float = 1.0) -> None:
        """Keep g0 = p.grad / grad_scale, save theta_old and ascend to theta + eps. Call after the first backward.

        Args:
            zero_grad: clear the gradients afterwards, ready for the second backward.
            grad_scale: the AMP loss scale the gradients are multiplied by (``scaler.get_scale()``).
        """
        self._ascent_step(grad_scale, keep_grad=True)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Copy theta_old back and write the constrained gradient into ``p.grad`` of every perturbed tensor.

        Tensors that got a gradient only in the second pass keep it; a perturbed tensor with no second-pass
        gradient counts as g1 = 0.
        """
        restored = self._restore_weights()
        pairs = [(p, self.state[p].pop("g0")) for p in restored if "g0" in self.state[p]]
        if not pairs:
            return
        params = [p for p, _ in pairs]
        g0s = [g0 for _, g0 in pairs]
        g1s = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.granularity == "tensor":
            finals = [
                constrained_gradient([a], [b], self.beta1, self.beta2)[0]
                for a, b in zip(g1s, g0s, strict=True)
            ]
        else:
            finals = constrained_gradient(g1s, g0s, self.beta1, self.beta2)
        for p, g in zip(params, finals, strict=True):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)
