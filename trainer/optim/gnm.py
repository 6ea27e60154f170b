"""GNM: Gaussian Neighborhood Minimization, one forward/backward pass per step.

Paper: "Gaussian Neighborhood Minimization for Long-Tailed Visual Recognition" (GNM-PT), NeurIPS 2024,
arXiv:2410.21042. Reference code: Keke921/GNM-PT ``rsam.py`` (``gnm.py`` is the same code renamed).

GNM minimises the Gaussian-smoothed loss E_{eps ~ N(0, s^2 I)} L(theta + eps) with a single-sample gradient. The
perturbation is drawn *before* the forward and depends on neither the data nor the gradient (the paper's argument
against SAM on long tails, whose ascent direction is dominated by head-class samples)::

    z     ~ N(0, sigma^2) element-wise;  z <- clamp(z, -clip_sigmas*sigma, +clip_sigmas*sigma)
    eps   = rho * kappa * c * z          # c: noise factor, 1 before the DRW epoch and noise_decay after it
    theta_old <- theta;  theta <- theta + eps
    the only pass:  g = grad L_B(theta + eps)
    theta <- theta_old (exact copy);  base_step(theta, g)     # weight decay and momentum act at theta

Clamping (not resampling) keeps the variance almost intact: std(eps) = 0.9975 * rho*kappa*sigma*c at 3 sigma, and
about 0.27 % of the entries sit on the bound. Defaults (rho 0.05, kappa 0.1, sigma 1/3, clip at 3 sigma) give
std ~ 1.67e-3 and |eps| <= 5e-3, an absolute scale (not normalised by ||theta|| or ||g||).

Differences from the reference code, on purpose: every perturbed tensor is restored (the reference restores only
those that received a grad); the epoch-dependent factor is set by ``on_epoch`` (``noise_decay`` from the DRW
epoch on) instead of being computed from the epoch (whose 0-indexed formula doubles the noise in epoch 0); the noise comes from the optimizer's own
generator, saved in ``state_dict`` for an exact resume.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch.optim.optimizer import ParamsT, StateDict

from trainer.optim.base import BaseOptimizerFactory, EpochStats, SharpnessOptimizer, check_hyperparameter

__all__ = ["GNM", "GNM_CLIP_SIGMAS", "GNM_KAPPA", "GNM_NOISE_DECAY", "GNM_RHO", "GNM_SIGMA"]

GNM_RHO = 0.05
"""Default neighbourhood scale (GNM-PT)."""
GNM_KAPPA = 0.1
"""Default noise multiplier (GNM-PT ``dis_mul``)."""
GNM_SIGMA = 1.0 / 3.0
"""Default standard deviation of the base noise."""
GNM_CLIP_SIGMAS = 3.0
"""Default clamp of the noise, in sigmas (+-1 at sigma 1/3)."""
GNM_NOISE_DECAY = 0.5
"""Default noise factor from the re-weighting epoch on (GNM-PT halves the noise at its DRW epoch)."""

_logger = logging.getLogger(__name__)


class GNM(SharpnessOptimizer):
    """Gaussian neighbourhood minimization around an injected base optimizer.

    The noise is drawn in fp32 on the CPU from the optimizer's own ``torch.Generator`` and then moved to each
    tensor's device and dtype, so a given seed gives the same perturbations on any device (the transfer is
    |theta| floats per step, negligible for prompt parameters). Under DDP pass a different seed per rank: the
    all-reduced gradient then averages one noise sample per rank.

    Args:
        params: tensors or param-group dicts to optimize (a group may set its own ``rho``). Every tensor with
            ``requires_grad`` is perturbed.
        base_optimizer: optimizer class (or factory) built as ``base_optimizer(param_groups, **base_kwargs)``.
        rho: neighbourhood scale, >= 0 (:data:`GNM_RHO`, 0.05 in GNM-PT).
        kappa: noise multiplier (``dis_mul`` in GNM-PT), >= 0 (:data:`GNM_KAPPA`, 0.1).
        sigma: standard deviation of the base noise, > 0 (:data:`GNM_SIGMA`, 1/3).
        clip_sigmas: the noise is clamped at +-clip_sigmas * sigma, > 0 (:data:`GNM_CLIP_SIGMAS`, 3, i.e. +-1 at
            sigma = 1/3).
        noise_decay: the noise factor ``on_epoch`` sets from the re-weighting epoch on, >= 0
            (:data:`GNM_NOISE_DECAY`, 0.5); 1 before it.
        seed: seed of the noise generator; None draws one from torch's global generator (so
            ``torch.manual_seed`` still makes the run reproducible).
        **base_kwargs: forwarded to the base optimizer (``lr``, ``momentum``, ``weight_decay``...).
    """

    passes: ClassVar[int] = 1
    perturb_before_forward: ClassVar[bool] = True
    local_final_grad: ClassVar[bool] = False

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: BaseOptimizerFactory,
        rho: float = GNM_RHO,
        kappa: float = GNM_KAPPA,
        sigma: float = GNM_SIGMA,
        clip_sigmas: float = GNM_CLIP_SIGMAS,
        seed: int | None = None,
        noise_decay: float = GNM_NOISE_DECAY,
        **base_kwargs: Any,
    ) -> None:
        check_hyperparameter("rho", rho, low=0.0)
        self.kappa = check_hyperparameter("kappa", kappa, low=0.0)
        self.noise_decay = check_hyperparameter("noise_decay", noise_decay, low=0.0)
        self.sigma = check_hyperparameter("sigma", sigma, low=0.0, low_open=True)
        self.clip_sigmas = check_hyperparameter("clip_sigmas", clip_sigmas, low=0.0, low_open=True)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)
        self._noise_factor = 1.0
        super().__init__(params, base_optimizer, {"rho": rho}, **base_kwargs)

    # ------------------------------------------------------------------------------------------ noise scale
    @property
    def noise_factor(self) -> float:
        """The factor c in eps = rho * kappa * c * z (1 before the re-weighting epoch, noise_decay after)."""
        return self._noise_factor

    def on_epoch(self, epoch: int, drw_epoch: int) -> None:
        """Set the noise factor for ``epoch``: ``noise_decay`` from ``drw_epoch`` (0-indexed) on, 1 before it."""
        self.set_noise_factor(self.noise_decay if epoch >= drw_epoch else 1.0)

    def epoch_stats(self) -> EpochStats:
        return {"noise_factor": self._noise_factor}

    def set_noise_factor(self, c: float) -> None:
        """Set the factor c of the noise scale (``on_epoch`` sets ``noise_decay`` from the DRW epoch on).

        Raises:
            ValueError: if c is negative or not finite.
        """
        self._noise_factor = check_hyperparameter("noise_factor", c, low=0.0)

    @property
    def sigma_eff(self) -> float:
        """Standard deviation of the noise before clamping, rho * kappa * sigma * c (default rho)."""
        return float(self.defaults["rho"]) * self.kappa * self.sigma * self._noise_factor

    # --------------------------------------------------------------------------------------------- protocol
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scale: float = 1.0) -> None:
        """Draw eps, save theta_old and move to theta + eps. Call *before* the forward.

        Args:
            zero_grad: clear the gradients afterwards.
            grad_scale: unused (the noise does not depend on the gradient); accepted for a uniform protocol.
        """
        self._begin_perturbation()
        bound = self.clip_sigmas * self.sigma
        for group in self.param_groups:
            scale = group["rho"] * self.kappa * self._noise_factor
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                # same shape as p, fp32 on the CPU generator: independent of device, dtype and data
                z = torch.randn(p.shape, generator=self._generator, dtype=torch.float32)
                eps = z.mul_(self.sigma).clamp_(-bound, bound).mul_(scale)
                self._save(p)
                p.add_(eps.to(device=p.device, dtype=p.dtype))
        if zero_grad:
            self.zero_grad()

    # ------------------------------------------------------------------------------------------ state dict
    def _extra_state(self) -> StateDict:
        return {"generator_state": self._generator.get_state(), "noise_factor": self._noise_factor}

    def _load_extra_state(self, extra: StateDict | None) -> None:
        if not extra or "generator_state" not in extra:
            _logger.warning(
                "GNM state dict has no generator state: the noise sequence will not resume exactly"
            )
            return
        self._generator.set_state(extra["generator_state"].cpu())
        self.set_noise_factor(float(extra.get("noise_factor", 1.0)))
