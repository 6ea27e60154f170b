"""Shared machinery of the sharpness / neighbourhood optimizers (SAM, ASAM, GNM, GCSAM).

Every optimizer here is a *wrapper*: it perturbs the trainable tensors, lets the caller run a forward and
backward at the perturbed point, puts the saved weights back **by exact copy** and then hands the gradient to an
injected base optimizer (``torch.optim.SGD`` / ``AdamW``), which applies weight decay, momentum and the LR at the
restored weights. The pattern of an injected base class whose ``param_groups`` list is shared with the wrapper
comes from davda54/sam (``sam.py``); saving the base optimizer's state with the wrapper's follows timm's
``Lookahead`` (davda54/sam inherits ``state_dict`` and so silently drops the base momentum on resume).

The optimizers never hold the model, never run a forward pass and never all-reduce: those belong to the training
step (``trainer/engine.py``), which drives them through ``first_step`` / ``restore`` / ``second_step`` or through
the closure form ``step(closure)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypedDict

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT, StateDict

__all__ = [
    "NORM_EPS",
    "BaseOptimizerFactory",
    "EpochStats",
    "SharpnessOptimizer",
    "check_hyperparameter",
    "epoch_stats",
    "on_epoch",
]

NORM_EPS = 1e-12
"""Added to (or used as a floor of) every norm we divide by, so a zero gradient never gives NaN."""

BaseOptimizerFactory = type[Optimizer] | Callable[..., Optimizer]

# key under which a wrapper stores its own (non-base) state in ``state_dict()``
_EXTRA_KEY = "sharpness"


class EpochStats(TypedDict):
    """What an optimizer reports per epoch for the metrics record (None where it does not apply)."""

    noise_factor: float | None  # GNM's factor c of the noise scale


def check_hyperparameter(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite real number inside the given range, else raise.

    Raises:
        ValueError: naming the hyperparameter, the allowed range and the value received.
    """
    lo_br = "(" if low_open or math.isinf(low) else "["
    hi_br = ")" if high_open or math.isinf(high) else "]"
    allowed = f"{lo_br}{low:g}, {high:g}{hi_br}".replace("inf", "∞")  # e.g. "[0, ∞)", "(-∞, ∞)"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a real number in {allowed}, got {value!r}")
    v = float(value)
    ok = math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low)
    ok = ok and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"{name} must be a finite number in {allowed}, got {value!r}")
    return v


class SharpnessOptimizer(Optimizer):
    """Base class of the perturb / restore / base-step wrappers.

    Subclasses set the three class attributes the training engine reads and implement ``first_step`` (and
    ``restore`` when the final gradient is not simply the one at the perturbed point).

    Attributes:
        passes: forward+backward passes per step (GNM 1; SAM, ASAM and GCSAM 2).
        perturb_before_forward: True when ``first_step`` is called *before* the forward (GNM), False when it is
            called after the first backward (SAM, GCSAM).
        local_final_grad: True when the final gradient is formed per rank from two local gradients (GCSAM):
            under DDP the engine then runs both backwards without gradient sync and all-reduces ``p.grad``
            itself after ``restore()``.
        base_optimizer: the injected optimizer; its ``param_groups`` list *is* this optimizer's.

    ``rho`` is a param-group option (like ``lr``): a per-group value or a schedule acting on the shared groups
    drives it. Every other hyperparameter is fixed per optimizer instance.
    """

    passes: ClassVar[int]
    perturb_before_forward: ClassVar[bool]
    local_final_grad: ClassVar[bool] = False
    base_optimizer: Optimizer

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: BaseOptimizerFactory,
        defaults: Mapping[str, float],
        **base_kwargs: Any,
    ) -> None:
        if not callable(base_optimizer):
            raise TypeError(
                f"base_optimizer must be an optimizer class or factory, got {type(base_optimizer).__name__}"
            )
        # the wrapper's groups carry its own options (rho) and the base's (lr, momentum...), so a group added
        # later through add_param_group gets both sets of defaults
        super().__init__(params, {**defaults, **base_kwargs})
        # the base optimizer is built over the *same* group dicts; afterwards the list itself is shared, so an
        # LR scheduler attached to either optimizer drives both
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    # ----------------------------------------------------------------------------------------- validation
    def _validate_group(self, group: Mapping[str, object]) -> None:
        """Check the per-group options; subclasses extend this."""
        check_hyperparameter("rho", group["rho"], low=0.0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:  # torch's signature
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])

    @staticmethod
    def _check_grad_scale(grad_scale: float) -> float:
        return check_hyperparameter("grad_scale", grad_scale, low=0.0, low_open=True)

    # ---------------------------------------------------------------------------------------- epoch hooks
    def on_epoch(self, epoch: int, drw_epoch: int) -> None:
        """Called by the trainer at the start of every (0-indexed) ``epoch``; ``drw_epoch`` is the epoch at which
        re-weighting switches on. A no-op here; GNM decays its noise from ``drw_epoch`` on."""
        return None

    def epoch_stats(self) -> EpochStats:
        """The per-epoch values the trainer records (all None here; GNM reports its noise factor)."""
        return {"noise_factor": None}

    # ----------------------------------------------------------------------------------- perturbation state
    @property
    def is_perturbed(self) -> bool:
        """True between ``first_step`` and ``restore``: some tensor holds theta + eps, not theta."""
        return any("old_p" in s for s in self.state.values())

    def _begin_perturbation(self) -> None:
        if self.is_perturbed:
            raise RuntimeError(
                f"{type(self).__name__}.first_step() called while the parameters are still perturbed: "
                "call restore() (or second_step()) before the next first_step()"
            )

    def _save(self, p: torch.Tensor) -> None:
        # a copy, so restore() is exact (GSAM's subtraction of e_w is not, under rounding)
        self.state[p]["old_p"] = p.detach().clone()

    @torch.no_grad()
    def _restore_weights(self) -> list[torch.Tensor]:
        """Copy theta_old back into every perturbed tensor; return those tensors (in group order)."""
        restored = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state is not None and "old_p" in state:
                    p.copy_(state.pop("old_p"))
                    restored.append(p)
        return restored

    def _global_grad_norm(self, inv_scale: float, *, adaptive: bool, eta: float) -> torch.Tensor:
        """||T g||_2 over every tensor of every group that has a grad, g = p.grad * inv_scale.

        T = |theta| + eta (ASAM) or the identity. Accumulated in at least fp32 on the first tensor's device.
        """
        norms = []
        device: torch.device | None = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                if device is None:
                    device = p.grad.device
                g = p.grad * inv_scale
                if adaptive:
                    g = g * (p.detach().abs() + eta)
                acc = torch.promote_types(g.dtype, torch.float32)
                norms.append(torch.linalg.vector_norm(g, dtype=acc).to(device))
        if not norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(norms))

    @torch.no_grad()
    def _ascent_step(
        self, grad_scale: float, *, adaptive: bool = False, eta: float = 0.0, keep_grad: bool = False
    ) -> None:
        """SAM's ascent: theta <- theta + eps, eps = rho * T^2 g / (||T g|| + 1e-12), global norm.

        ``g = p.grad / grad_scale`` undoes an AMP loss scale. Only tensors with a grad are perturbed. When the
        global norm is not finite (fp16 overflow) eps is set to zero, so no NaN reaches the weights; the
        second pass then overflows the same way and the scaler skips the step. ``keep_grad`` stores the
        unscaled g as ``state[p]["g0"]`` (GCSAM).
        """
        self._begin_perturbation()
        inv_scale = 1.0 / self._check_grad_scale(grad_scale)
        norm = self._global_grad_norm(inv_scale, adaptive=adaptive, eta=eta)
        finite = torch.isfinite(norm)  # 0-d bool tensor: no host sync
        for group in self.param_groups:
            scale = group["rho"] / (norm + NORM_EPS)  # 0-d
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                g = p.grad * inv_scale
                if keep_grad:
                    self.state[p]["g0"] = g.clone()
                e = g * scale.to(g.device)
                if adaptive:
                    e = e * (p.detach().abs() + eta).pow(2)
                e = torch.where(finite.to(e.device), e, torch.zeros_like(e))
                self._save(p)
                p.add_(e.to(p.dtype))

    # ------------------------------------------------------------------------------------ public protocol
    def first_step(self, zero_grad: bool = False, grad_scale: float = 1.0) -> None:
        """Save theta_old and move to theta + eps (see the subclass for eps)."""
        raise NotImplementedError

    def restore(self) -> None:
        """Put theta_old back by exact copy into every perturbed tensor (a no-op when nothing is perturbed).

        Works whatever the gradients hold (inf / NaN after an fp16 overflow): it only copies weights.
        """
        self._restore_weights()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """``restore()``, then one step of the base optimizer at the restored weights."""
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One full step; ``closure`` re-evaluates the loss and calls ``backward()``. Returns its first loss.

        The closure runs exactly ``passes`` times. Two-pass optimizers return the loss at theta; GNM returns
        the loss at theta + eps. Zero the gradients before calling (or inside the closure), as with any
        ``torch.optim`` optimizer. If the closure raises, the weights are restored before re-raising.
        """
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure that re-evaluates the loss and calls backward() "
                f"({self.passes} pass(es) per step); or drive first_step()/second_step() yourself"
            )
        closure = torch.enable_grad()(closure)
        try:
            if self.perturb_before_forward:
                self.first_step()
                loss = closure()
            else:
                loss = closure()
                self.first_step(zero_grad=True)
                closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------------------------------ state dict
    def _extra_state(self) -> StateDict:
        """The wrapper's own persistent state (GNM: generator state, noise factor)."""
        return {}

    def _load_extra_state(self, extra: StateDict | None) -> None:
        return None

    def state_dict(self) -> StateDict:
        """The base optimizer's state dict (momentum / Adam moments and the shared groups, rho included) plus
        the wrapper's own state under ``"sharpness"``.

        Raises:
            RuntimeError: while the parameters are perturbed (between ``first_step`` and ``restore``), since a
                checkpoint taken then would hold theta + eps.
        """
        if self.is_perturbed:
            raise RuntimeError(
                f"{type(self).__name__}.state_dict() called while the parameters are perturbed: restore() first"
            )
        sd = self.base_optimizer.state_dict()
        sd[_EXTRA_KEY] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: StateDict) -> None:
        sd = dict(state_dict)
        extra = sd.pop(_EXTRA_KEY, None)
        self.base_optimizer.load_state_dict(sd)
        # torch builds new group dicts on load: re-link so the wrapper and the base share them again
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            self._validate_group(group)
        self.state.clear()  # only transient perturbation state lives here
        self._load_extra_state(extra)


def on_epoch(optimizer: Optimizer, epoch: int, drw_epoch: int) -> None:
    """Run ``optimizer``'s start-of-epoch hook (:meth:`SharpnessOptimizer.on_epoch`); nothing for a plain torch
    optimizer."""
    if isinstance(optimizer, SharpnessOptimizer):
        optimizer.on_epoch(epoch, drw_epoch)


def epoch_stats(optimizer: Optimizer) -> EpochStats:
    """``optimizer``'s per-epoch record values (:meth:`SharpnessOptimizer.epoch_stats`); all None for a plain
    torch optimizer."""
    if isinstance(optimizer, SharpnessOptimizer):
        return optimizer.epoch_stats()
    return {"noise_factor": None}
