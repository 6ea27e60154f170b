"""SAM and ASAM: sharpness-aware minimization, two forward/backward passes per step.

- SAM: P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
  Generalization", ICLR 2021, arXiv:2010.01412.
- ASAM: J. Kwon, J. Kim, H. Park, I. K. Choi, "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
  Learning of Deep Neural Networks", ICML 2021, arXiv:2102.11600.

Update (global norm over every tensor with a gradient, in every param group)::

    pass 1:  g0 = grad L_B(theta)
             eps = rho * T^2 g0 / (||T g0|| + 1e-12)      # T = I (SAM) or diag(|theta| + eta) (ASAM)
             theta_old <- theta;  theta <- theta + eps
    pass 2:  g1 = grad L_B(theta + eps)
             theta <- theta_old (exact copy);  base_step(theta, g1)

The wrapper form (injected base optimizer class, shared ``param_groups``) follows davda54/sam ``sam.py``; unlike
it, ``state_dict`` here includes the base optimizer's momentum, restoration is an exact copy, and ASAM uses
T = |theta| + eta on every tensor (the official ``asam.py`` uses eta = 0.01 but scales only "weight" tensors;
davda54's ``adaptive=True`` uses eta = 0).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.optim.optimizer import ParamsT

from trainer.optim.base import BaseOptimizerFactory, SharpnessOptimizer, check_hyperparameter

__all__ = ["ASAM_ETA", "ASAM_RHO", "SAM", "SAM_RHO"]

SAM_RHO = 0.05
"""SAM's default radius (davda54/sam; ASAM README: 0.05 on CIFAR-10, 0.1 on CIFAR-100)."""
ASAM_RHO = 0.5
"""ASAM's default radius (ASAM README: 0.5 on CIFAR-10, 1.0 on CIFAR-100; ~10x SAM's because T rescales g)."""
ASAM_ETA = 0.01
"""ASAM's offset eta in T = |theta| + eta (the official ``asam.py``)."""


class SAM(SharpnessOptimizer):
    """Sharpness-aware minimization (and ASAM with ``adaptive=True``) around an injected base optimizer.

    Under DDP the engine runs the first backward without gradient sync, so each rank ascends along its own
    gradient (the per-accelerator epsilon of the SAM paper); the second pass syncs as usual.

    Args:
        params: tensors or param-group dicts to optimize (a group may set its own ``rho``).
        base_optimizer: optimizer class (or factory) built as ``base_optimizer(param_groups, **base_kwargs)``.
        rho: radius of the ascent step, >= 0; None takes :data:`SAM_RHO` (0.05) for SAM and :data:`ASAM_RHO`
            (0.5) for ASAM, the same defaults as the optimizer registry's ``default_rho``.
        adaptive: ASAM's scale-invariant ascent with T = |theta| + eta.
        eta: ASAM's offset in T, >= 0 (:data:`ASAM_ETA`, 0.01 as in the official ``asam.py``).
        **base_kwargs: forwarded to the base optimizer (``lr``, ``momentum``, ``weight_decay``...).
    """

    passes: ClassVar[int] = 2
    perturb_before_forward: ClassVar[bool] = False
    local_final_grad: ClassVar[bool] = False

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: BaseOptimizerFactory,
        rho: float | None = None,
        adaptive: bool = False,
        eta: float = ASAM_ETA,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
        if rho is None:
            rho = ASAM_RHO if adaptive else SAM_RHO
        check_hyperparameter("rho", rho, low=0.0)
        self.adaptive = adaptive
        self.eta = check_hyperparameter("eta", eta, low=0.0)
        super().__init__(params, base_optimizer, {"rho": rho}, **base_kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scale: float = 1.0) -> None:
        """Save theta_old and ascend to theta + eps. Call after the first backward.

        Args:
            zero_grad: clear the gradients afterwards, ready for the second backward.
            grad_scale: the AMP loss scale the gradients are multiplied by (``scaler.get_scale()``); eps is
                built from ``p.grad / grad_scale``.
        """
        self._ascent_step(grad_scale, adaptive=self.adaptive, eta=self.eta)
        if zero_grad:
            self.zero_grad()
