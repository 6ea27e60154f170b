"""Optimizer tests: one harness parametrised over every optimizer, then the per-method properties.

Spec: shared/notes/algorithms.md §2 (update rules, limiting cases, unit tests listed per method).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

from trainer.config import OptimConfig
from trainer.optim import (
    BASE_OPTIMIZERS,
    DEFAULT_RHO,
    GCSAM,
    GNM,
    OPTIMIZER_NAMES,
    OPTIMIZERS,
    SAM,
    TWO_PASS,
    OptimizerSpec,
    SharpnessOptimizer,
    build_optimizer,
    constrained_gradient,
    epoch_stats,
    get_optimizer_spec,
    on_epoch,
    passes_of,
    register_optimizer,
)

WRAPPERS = ("sam", "asam", "gnm", "gcsam")


# --------------------------------------------------------------------------------------------------- helpers
def _spd(d: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A well-conditioned symmetric positive-definite [d, d] matrix."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (m @ m.T / d + 0.5 * torch.eye(d, dtype=torch.float64)).to(dtype)


def _params(sizes: Sequence[int] = (4, 3), seed: int = 1, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=dtype).requires_grad_() for n in sizes]


def _clone(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


class Quadratic:
    """L(theta) = 0.5 theta^T A theta over the concatenation of ``params``; counts closure calls."""

    def __init__(self, params: Sequence[Tensor], a: Tensor) -> None:
        self.params = list(params)
        self.a = a
        self.calls = 0

    def loss(self) -> Tensor:
        theta = torch.cat([p.reshape(-1) for p in self.params])
        return 0.5 * theta @ self.a @ theta

    def closure(self) -> Tensor:
        self.calls += 1
        loss = self.loss()
        loss.backward()
        return loss.detach()


def _make(name: str, params: object, seed: int | None = 0, **kw: object) -> torch.optim.Optimizer:
    """The factory's optimizer; the config section is built unvalidated (model_construct) so a test may use
    values the config refuses (lr 0) and the factory's own errors are what is tested."""
    args: dict[str, object] = {"lr": 0.05, "weight_decay": 1e-3}
    args.update(kw)
    return build_optimizer(params, OptimConfig.model_construct(name=name, **args), seed=seed)  # type: ignore[arg-type]


def _step(opt: torch.optim.Optimizer, closure: Callable[[], Tensor]) -> Tensor:
    opt.zero_grad()
    return opt.step(closure)  # type: ignore[arg-type,return-value]


def _run(name: str, steps: int, **kw: object) -> list[Tensor]:
    params = _params()
    q = Quadratic(params, _spd(7, 0))
    opt = _make(name, params, **kw)
    for _ in range(steps):
        _step(opt, q.closure)
    return [p.detach() for p in params]


# ------------------------------------------------------------------------------------ the shared harness
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_loss_decreases_on_a_quadratic(name: str) -> None:
    params = _params()
    q = Quadratic(params, _spd(7, 0))
    opt = _make(name, params, lr=0.1 if name != "adamw" else 0.05, rho=0.05 if name == "asam" else None)
    with torch.no_grad():
        start = float(q.loss())
    for _ in range(40):
        _step(opt, q.closure)
    with torch.no_grad():
        end = float(q.loss())
    assert end < 0.05 * start, (start, end)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_closure_runs_passes_times_per_step(name: str) -> None:
    params = _params()
    q = Quadratic(params, _spd(7, 0))
    opt = _make(name, params)
    expected = {"sgd": 1, "adamw": 1, "sam": 2, "asam": 2, "gnm": 1, "gcsam": 2}[name]
    assert passes_of(opt) == expected
    for _ in range(3):
        _step(opt, q.closure)
    assert q.calls == 3 * expected


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_dict_round_trip_steps_in_lockstep(name: str) -> None:
    a = _spd(7, 0)
    params = _params()
    q = Quadratic(params, a)
    opt = _make(name, params, seed=3)
    for _ in range(3):
        _step(opt, q.closure)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)  # a real save / load, as a checkpoint does
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    params2 = _clone(params)
    q2 = Quadratic(params2, a)
    opt2 = _make(name, params2, seed=12345)  # a different seed: the generator state must come from the dict
    opt2.load_state_dict(saved)
    if name != "adamw":  # SGD momentum is saved for the plain and the wrapped base alike
        assert "momentum_buffer" in saved["state"][0]
    if isinstance(opt2, SharpnessOptimizer):
        assert opt2.param_groups is opt2.base_optimizer.param_groups
    for _ in range(3):
        _step(opt, q.closure)
        _step(opt2, q2.closure)
        for p, p2 in zip(params, params2, strict=True):
            assert torch.equal(p, p2)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_frozen_tensors_never_change(name: str) -> None:
    trainable = _params((5,))[0]
    frozen = torch.randn(5)  # requires_grad False, but handed to the optimizer anyway
    frozen0 = frozen.clone()
    seen: list[Tensor] = []

    def closure() -> Tensor:
        seen.append(frozen.clone())  # what the forward sees, perturbed or not
        loss = (trainable * (1.0 + frozen)).pow(2).sum()
        loss.backward()
        return loss.detach()

    opt = _make(name, [trainable, frozen])
    for _ in range(3):
        _step(opt, closure)
    assert torch.equal(frozen, frozen0)
    assert all(torch.equal(s, frozen0) for s in seen)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_lr_zero_leaves_theta_bit_identical(name: str) -> None:
    params = _params()
    before = _clone(params)
    q = Quadratic(params, _spd(7, 0))
    opt = _make(name, params, lr=0.0, weight_decay=1e-2)
    for _ in range(2):
        _step(opt, q.closure)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_per_group_lr_is_honoured(name: str) -> None:
    p0, p1 = _params()
    b0, b1 = p0.detach().clone(), p1.detach().clone()
    q = Quadratic([p0, p1], _spd(7, 0))
    opt = _make(name, [{"params": [p0]}, {"params": [p1], "lr": 0.0}], lr=0.1)
    _step(opt, q.closure)
    assert not torch.equal(p0, b0)
    assert torch.equal(p1, b1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("name", WRAPPERS)
def test_scheduler_on_the_base_drives_the_wrapper(name: str) -> None:
    opt = _make(name, _params(), lr=0.1)
    assert isinstance(opt, SharpnessOptimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, lambda step: 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.param_groups[0]["lr"] = 0.25  # and the other way round
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.25
    del sched


@pytest.mark.parametrize("name", WRAPPERS)
def test_step_without_closure_raises(name: str) -> None:
    opt = _make(name, _params())
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("sam", {"rho": 0.0}),
        ("asam", {"rho": 0.0}),
        ("gcsam", {"rho": 0.0}),
        ("gnm", {"rho": 0.0}),
        ("gnm", {"kappa": 0.0}),
        ("gcsam", {"beta1": 1.0}),  # GCSAM limiting case (3): always g0, i.e. the base step at theta
    ],
)
def test_zero_perturbation_equals_the_base_optimizer_bit_for_bit(name: str, kw: dict, base: str) -> None:
    reference = _run(base, 5)
    got = _run(name, 5, base=base, **kw)
    for r, g in zip(reference, got, strict=True):
        assert torch.equal(r, g)


def test_factory_names_defaults_and_errors() -> None:
    assert OPTIMIZER_NAMES == ("sgd", "adamw", "sam", "asam", "gnm", "gcsam")
    assert type(_make("sgd", _params())) is torch.optim.SGD
    assert type(_make("adamw", _params())) is torch.optim.AdamW
    for name in WRAPPERS:
        opt = _make(name, _params(), base="adamw")
        assert isinstance(opt, SharpnessOptimizer)
        assert isinstance(opt.base_optimizer, torch.optim.AdamW)
        assert opt.param_groups[0]["rho"] == DEFAULT_RHO[name]
    asam = _make("asam", _params())
    assert isinstance(asam, SAM) and asam.adaptive and asam.eta == 0.01
    assert _make("sam", _params(), rho=0.2).param_groups[0]["rho"] == 0.2
    with pytest.raises(ValueError, match=r"'lbfgs'.*sgd.*gcsam"):
        _make("lbfgs", _params())
    with pytest.raises(ValueError, match=r"'adam'.*sgd.*adamw"):
        _make("sam", _params(), base="adam")


def test_registry_specs_agree_with_the_classes() -> None:
    assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES and tuple(BASE_OPTIMIZERS) == ("sgd", "adamw")
    assert TWO_PASS == ("sam", "asam", "gcsam")
    assert DEFAULT_RHO == {"sam": 0.05, "asam": 0.5, "gnm": 0.05, "gcsam": 0.1}
    for name, spec in OPTIMIZERS.items():
        opt = _make(name, _params())
        assert type(opt) is spec.cls and passes_of(opt) == spec.passes
        assert set(spec.hyperparameters) <= set(OptimConfig.model_fields), name
        if spec.default_rho is None:
            assert not isinstance(opt, SharpnessOptimizer)
            continue
        assert opt.param_groups[0]["rho"] == spec.default_rho
    # the class built directly with rho omitted uses the spec's default (ASAM used to get SAM's 0.05)
    direct = {
        "sam": SAM(_params(), torch.optim.SGD, lr=0.1),
        "asam": SAM(_params(), torch.optim.SGD, adaptive=True, lr=0.1),
        "gnm": GNM(_params(), torch.optim.SGD, lr=0.1),
        "gcsam": GCSAM(_params(), torch.optim.SGD, lr=0.1),
    }
    for name, opt in direct.items():
        assert opt.param_groups[0]["rho"] == get_optimizer_spec(name).default_rho, name
    # the constructor defaults of the other hyperparameters are OptimConfig's field defaults
    o = OptimConfig()
    gnm, gcsam = direct["gnm"], direct["gcsam"]
    assert isinstance(gnm, GNM) and isinstance(gcsam, GCSAM)
    assert (gnm.kappa, gnm.sigma, gnm.clip_sigmas, gnm.noise_decay) == (
        o.kappa,
        o.sigma,
        o.clip_sigmas,
        o.noise_decay,
    )
    assert (gcsam.beta1, gcsam.beta2, gcsam.granularity) == (o.beta1, o.beta2, o.granularity)


def test_registry_errors_name_the_allowed_names() -> None:
    with pytest.raises(
        ValueError, match=r"unknown optimizer 'lbfgs': expected one of \('sgd', 'adamw', 'sam'"
    ):
        get_optimizer_spec("lbfgs")
    with pytest.raises(ValueError, match="'sam' is already registered"):
        register_optimizer(OPTIMIZERS["sam"])
    with pytest.raises(ValueError, match="passes must be 1 or 2"):
        OptimizerSpec("x", SAM, OPTIMIZERS["sam"].builder, 3, 0.1, (), "bad")


def test_factory_passes_the_config_section() -> None:
    o = OptimConfig(name="gnm", base="adamw", lr=0.01, rho=0.2, kappa=0.3, noise_decay=0.25)
    opt = build_optimizer(_params(), o, seed=1)
    assert isinstance(opt, GNM) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert opt.param_groups[0]["rho"] == 0.2 and opt.param_groups[0]["lr"] == 0.01
    assert opt.kappa == 0.3 and opt.noise_decay == 0.25
    g = build_optimizer(_params(), OptimConfig(name="gcsam", beta1=0.1, beta2=0.9, granularity="global"))
    assert isinstance(g, GCSAM) and (g.beta1, g.beta2, g.granularity) == (0.1, 0.9, "global")


def test_on_epoch_decays_gnm_noise_from_the_drw_epoch() -> None:
    opt = GNM(_params(), torch.optim.SGD, lr=0.1, noise_decay=0.25)
    factors = []
    for epoch in range(5):
        on_epoch(opt, epoch, 3)
        factors.append(epoch_stats(opt)["noise_factor"])
    assert factors == [1.0, 1.0, 1.0, 0.25, 0.25]
    opt.on_epoch(0, 3)  # back before the DRW epoch (a restart from scratch)
    assert opt.noise_factor == 1.0
    for name in ("sgd", "adamw", "sam", "asam", "gcsam"):  # a no-op for the others, and nothing recorded
        other = _make(name, _params())
        sd = other.state_dict()
        on_epoch(other, 4, 3)
        assert epoch_stats(other) == {"noise_factor": None}
        assert str(other.state_dict()) == str(sd)


def test_gnm_noise_factor_round_trips_and_old_state_dicts_load() -> None:
    opt = GNM(_params(), torch.optim.SGD, lr=0.1, seed=4)
    opt.on_epoch(5, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = GNM(_params(), torch.optim.SGD, lr=0.1, seed=9)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.noise_factor == 0.5
    assert torch.equal(fresh._generator.get_state(), opt._generator.get_state())
    # a state dict written before the noise factor was saved: factor 1
    old = opt.state_dict()
    del old["sharpness"]["noise_factor"]
    fresh.load_state_dict(old)
    assert fresh.noise_factor == 1.0


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda p: SAM(p, torch.optim.SGD, rho=-0.1, lr=0.1), "rho"),
        (lambda p: SAM(p, torch.optim.SGD, rho=float("nan"), lr=0.1), "rho"),
        (lambda p: SAM(p, torch.optim.SGD, adaptive=True, eta=-1.0, lr=0.1), "eta"),
        (lambda p: SAM([{"params": p, "rho": -1.0}], torch.optim.SGD, lr=0.1), "rho"),
        (lambda p: GNM(p, torch.optim.SGD, kappa=-0.1, lr=0.1), "kappa"),
        (lambda p: GNM(p, torch.optim.SGD, sigma=0.0, lr=0.1), "sigma"),
        (lambda p: GNM(p, torch.optim.SGD, clip_sigmas=0.0, lr=0.1), "clip_sigmas"),
        (lambda p: GNM(p, torch.optim.SGD, noise_decay=-0.5, lr=0.1), "noise_decay"),
        (lambda p: GNM(p, torch.optim.SGD, lr=0.1).set_noise_factor(-0.5), "noise_factor"),
        (lambda p: GCSAM(p, torch.optim.SGD, beta1=float("inf"), lr=0.1), "beta1"),
        (lambda p: GCSAM(p, torch.optim.SGD, beta2="0.8", lr=0.1), "beta2"),  # type: ignore[arg-type]
        (lambda p: GCSAM(p, torch.optim.SGD, granularity="layer", lr=0.1), "granularity"),
        (lambda p: SAM(p, torch.optim.SGD, lr=0.1).first_step(grad_scale=0.0), "grad_scale"),
    ],
)
def test_hyperparameter_validation_names_the_parameter(build: Callable, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        build(_params())


def test_range_message_states_the_allowed_range() -> None:
    with pytest.raises(ValueError, match=r"rho must be a finite number in \[0, ∞\), got -1"):
        SAM(_params(), torch.optim.SGD, rho=-1, lr=0.1)


# ------------------------------------------------------------------------------------------------- SAM
def test_sam_one_step_matches_the_closed_form() -> None:
    # L = 0.5 theta^T A theta: g = A theta, theta' = theta - lr * A (theta + rho * A theta / ||A theta||)
    a = _spd(7, 0, torch.float64)
    params = _params(dtype=torch.float64)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    lr, rho = 0.1, 0.3
    g = a @ theta
    expected = theta - lr * a @ (theta + rho * g / g.norm())
    opt = SAM(params, torch.optim.SGD, rho=rho, lr=lr, momentum=0.0, weight_decay=0.0)
    _step(opt, Quadratic(params, a).closure)
    got = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _captured_eps(opt: SharpnessOptimizer, params: list[Tensor], a: Tensor) -> Tensor:
    """eps = theta + eps - theta as seen by the second (two-pass) or only (GNM) forward."""
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    q = Quadratic(params, a)
    eps: list[Tensor] = []

    def closure() -> Tensor:
        if q.calls == opt.passes - 1:
            eps.append(torch.cat([p.detach().reshape(-1) for p in params]) - theta0)
        return q.closure()

    _step(opt, closure)
    return eps[0]


def test_sam_eps_norm_is_rho_across_groups() -> None:
    a = _spd(7, 0, torch.float64)
    p0, p1 = _params(dtype=torch.float64)
    opt = SAM([{"params": [p0]}, {"params": [p1]}], torch.optim.SGD, rho=0.07, lr=0.1)
    eps = _captured_eps(opt, [p0, p1], a)
    assert float(eps.norm()) == pytest.approx(0.07, rel=1e-12)


def test_asam_eps_follows_the_adaptive_rule() -> None:
    # eps = rho * T^2 g / ||T g||, T = |theta| + eta, one norm over both groups
    a = _spd(7, 0, torch.float64)
    p0, p1 = _params(dtype=torch.float64)
    theta = torch.cat([p0.detach(), p1.detach()])
    rho, eta = 0.5, 0.01
    t = theta.abs() + eta
    g = a @ theta
    expected = rho * t**2 * g / (t * g).norm()
    opt = SAM([{"params": [p0]}, {"params": [p1]}], torch.optim.SGD, rho=rho, adaptive=True, eta=eta, lr=0.1)
    torch.testing.assert_close(_captured_eps(opt, [p0, p1], a), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("cls", [SAM, GCSAM])
def test_grad_scale_is_undone_in_first_step(cls: Callable[..., SharpnessOptimizer]) -> None:
    # an AMP loss scale (a power of two, so exact) must not change eps, nor the stored g0
    results = []
    for scale in (1.0, 1024.0):
        p = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
        opt = cls([p], torch.optim.SGD, rho=0.1, lr=0.1)
        (scale * (p**2).sum()).backward()
        opt.first_step(grad_scale=scale)
        results.append((p.detach().clone(), opt.state[p].get("g0")))
        opt.restore()
    assert torch.equal(results[0][0], results[1][0])
    if cls is GCSAM:
        assert torch.equal(results[1][1], torch.tensor([1.0, -2.0, 4.0]))


def test_a_tensor_without_grad_in_pass_one_is_not_perturbed() -> None:
    used, unused = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = SAM([used, unused], torch.optim.SGD, rho=0.5, lr=0.1)
    (used**2).sum().backward()
    opt.first_step()
    assert torch.equal(unused, torch.ones(2)) and not torch.equal(used, torch.ones(3))
    opt.restore()
    assert torch.equal(used, torch.ones(3))


@pytest.mark.parametrize("name", WRAPPERS)
def test_restore_is_exact_even_when_gradients_overflow(name: str) -> None:
    params = _params()
    before = _clone(params)
    opt = _make(name, params)
    assert isinstance(opt, SharpnessOptimizer)
    opt.zero_grad()
    if not opt.perturb_before_forward:
        Quadratic(params, _spd(7, 0)).closure()
    opt.first_step(zero_grad=True)
    assert opt.is_perturbed
    for p in params:  # an fp16 overflow in the pass at theta + eps
        p.grad = torch.full_like(p, float("inf"))
    opt.restore()
    assert not opt.is_perturbed
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("name", ["sam", "gcsam", "gnm"])
def test_engine_amp_protocol_matches_the_closure_form(name: str) -> None:
    # the engine: [GNM first_step] -> scaled backward -> [first_step(grad_scale); scaled backward]
    #             -> scaler.unscale_(base) -> restore() -> scaler.step(base) -> scaler.update()
    a = _spd(7, 0)
    ref_params, params = _params(), _params()
    ref_q, q = Quadratic(ref_params, a), Quadratic(params, a)
    ref = _make(name, ref_params, seed=5)
    opt = _make(name, params, seed=5)
    assert isinstance(opt, SharpnessOptimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(3):
        _step(ref, ref_q.closure)
        opt.zero_grad()
        if opt.perturb_before_forward:
            opt.first_step()
        scaler.scale(q.loss()).backward()
        if opt.passes == 2:
            opt.first_step(zero_grad=True, grad_scale=scaler.get_scale())
            scaler.scale(q.loss()).backward()
        scaler.unscale_(opt.base_optimizer)
        opt.restore()
        scaler.step(opt.base_optimizer)
        scaler.update()
        for r, p in zip(ref_params, params, strict=True):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)

    # an overflow in the second pass: the scaler skips the step, theta comes back untouched
    before = _clone(params)
    opt.zero_grad()
    if opt.perturb_before_forward:
        opt.first_step()
    scaler.scale(q.loss()).backward()
    if opt.passes == 2:
        opt.first_step(zero_grad=True, grad_scale=scaler.get_scale())
    params[0].grad = torch.full_like(params[0], float("inf"))
    scaler.unscale_(opt.base_optimizer)
    opt.restore()
    scale = scaler.get_scale()
    scaler.step(opt.base_optimizer)
    scaler.update()
    assert scaler.get_scale() < scale
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


def test_misuse_is_refused_and_a_failing_closure_restores() -> None:
    params = _params()
    before = _clone(params)
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    Quadratic(params, _spd(7, 0)).closure()
    opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="restore"):
        opt.first_step()
    opt.restore()
    opt.state_dict()

    calls = []

    def failing() -> Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("boom")
        return Quadratic(params, _spd(7, 0)).closure()

    with pytest.raises(FloatingPointError):
        opt.step(failing)
    assert not opt.is_perturbed
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)


# ----------------------------------------------------------------------------------------------- GCSAM
def _pair(c: float, n0: float = 2.0, n1: float = 3.0) -> tuple[Tensor, Tensor]:
    """2-D gradients with cosine c: g0 along x, g1 at angle acos(c)."""
    g0 = torch.tensor([n0, 0.0], dtype=torch.float64)
    g1 = n1 * torch.tensor([c, math.sqrt(1 - c * c)], dtype=torch.float64)
    return g0, g1


def _gcsam_final(g0: Tensor, g1: Tensor, **kw: object) -> Tensor:
    """Drive first_step / restore by hand with the given g0 (pass 1) and g1 (pass 2); return p.grad."""
    p = torch.zeros_like(g0, requires_grad=True)
    opt = GCSAM([p], torch.optim.SGD, lr=0.1, **kw)  # type: ignore[arg-type]
    p.grad = g0.clone()
    opt.first_step(zero_grad=True)
    p.grad = g1.clone()
    opt.restore()
    assert torch.equal(p.detach(), torch.zeros_like(g0))
    assert p.grad is not None
    return p.grad


def test_gcsam_hand_made_cosines_pick_g0_projection_g1() -> None:
    g0, g1 = _pair(0.3)
    assert torch.equal(_gcsam_final(g0, g1), g0)  # c <= beta1: conflict, ERM gradient

    g0, g1 = _pair(0.6)
    z = g0 + g1
    u = z / z.norm()
    torch.testing.assert_close(_gcsam_final(g0, g1), (g1 @ u) * u, rtol=1e-12, atol=1e-12)

    g0, g1 = _pair(0.9)
    assert torch.equal(_gcsam_final(g0, g1), g1)  # c >= beta2: agreement, SAM gradient


@pytest.mark.parametrize("c", [0.55, 0.65, 0.75])
@pytest.mark.parametrize("ratio", [0.3, 1.0, 4.0])
def test_gcsam_in_band_gradient_properties(c: float, ratio: float) -> None:
    g0, g1 = _pair(c, n0=1.0, n1=ratio)
    g = _gcsam_final(g0, g1)
    z = g0 + g1
    assert abs(float(g[0] * z[1] - g[1] * z[0])) < 1e-12  # g parallel to g0 + g1
    assert abs(float((g1 - g) @ g)) < 1e-12  # orthogonal projection of g1
    assert float(g.norm()) <= float(g1.norm()) + 1e-12
    assert float(g @ g0) > 0 and float(g @ g1) > 0  # descends for both losses


def test_gcsam_beta1_nonpositive_branch() -> None:
    g0, g1 = _pair(0.3)
    z = g0 + g1
    u = z / z.norm()
    # beta1 <= 0: c < beta2 -> projection (never g0), c >= beta2 -> g1
    torch.testing.assert_close(_gcsam_final(g0, g1, beta1=0.0), (g1 @ u) * u, rtol=1e-12, atol=1e-12)
    g0, g1 = _pair(0.9)
    assert torch.equal(_gcsam_final(g0, g1, beta1=0.0), g1)
    # g1 = -g0: the sum direction is undefined; projection 0, not NaN
    g0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert torch.equal(_gcsam_final(g0, -g0, beta1=-0.5), torch.zeros(2, dtype=torch.float64))


def test_gcsam_numeric_guards() -> None:
    zero = torch.zeros(2, dtype=torch.float64)
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert torch.equal(_gcsam_final(zero, g1), zero)  # g0 = 0: c = 0 <= beta1 -> g0, no NaN
    assert torch.equal(_gcsam_final(zero, zero), zero)
    bad = torch.tensor([float("inf"), 1.0], dtype=torch.float64)
    assert torch.equal(_gcsam_final(bad, g1), g1)  # non-finite c: keep the scaler-checked g1
    # rounding may push c just past +-1: the clamp keeps beta2 <= -1 at exactly SAM
    out = constrained_gradient([-g1.float()], [g1.float()], 0.0, -1.0)[0]
    assert torch.equal(out, -g1.float())


def test_gcsam_with_beta1_nonpositive_and_beta2_minus_one_is_sam() -> None:
    reference = _run("sam", 4, rho=0.1)
    got = _run("gcsam", 4, rho=0.1, beta1=0.0, beta2=-1.0)
    for r, g in zip(reference, got, strict=True):
        assert torch.equal(r, g)


def test_gcsam_granularity_tensor_vs_global() -> None:
    # tensor A agrees (c = 0.9 -> g1), tensor B conflicts (c = 0.3 -> g0); globally one cosine decides
    a0, a1 = _pair(0.9, n0=1.0, n1=1.0)
    b0, b1 = _pair(0.3, n0=1.0, n1=1.0)

    def final(granularity: str) -> list[Tensor]:
        pa, pb = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        pa.requires_grad_(), pb.requires_grad_()
        opt = GCSAM([pa, pb], torch.optim.SGD, lr=0.1, granularity=granularity)
        pa.grad, pb.grad = a0.clone(), b0.clone()
        opt.first_step(zero_grad=True)
        pa.grad, pb.grad = a1.clone(), b1.clone()
        opt.restore()
        assert pa.grad is not None and pb.grad is not None
        return [pa.grad, pb.grad]

    ga, gb = final("tensor")
    assert torch.equal(ga, a1) and torch.equal(gb, b0)
    # global cosine = (0.9 + 0.3) / 2 = 0.6: in the band, one projection over the concatenation
    g0, g1 = torch.cat([a0, b0]), torch.cat([a1, b1])
    z = g0 + g1
    u = z / z.norm()
    torch.testing.assert_close(torch.cat(final("global")), (g1 @ u) * u, rtol=1e-12, atol=1e-12)


def test_gcsam_runs_two_passes_and_marks_its_gradient_local() -> None:
    assert GCSAM.passes == 2 and GCSAM.local_final_grad and not GCSAM.perturb_before_forward
    assert SAM.passes == 2 and not SAM.local_final_grad and not SAM.perturb_before_forward
    assert GNM.passes == 1 and not GNM.local_final_grad and GNM.perturb_before_forward


# ------------------------------------------------------------------------------------------------- GNM
def _gnm_eps(n: int, seed: int = 0, factor: float = 1.0, **kw: object) -> Tensor:
    """One GNM perturbation of a zero vector of n elements (theta = 0, so theta + eps = eps exactly)."""
    p = torch.zeros(n, requires_grad=True)
    opt = GNM([p], torch.optim.SGD, lr=0.1, seed=seed, **kw)  # type: ignore[arg-type]
    opt.set_noise_factor(factor)
    opt.first_step()
    eps = p.detach().clone()
    opt.restore()
    assert torch.equal(p.detach(), torch.zeros(n))
    return eps


def test_gnm_noise_statistics() -> None:
    rho, kappa, sigma = 0.05, 0.1, 1.0 / 3.0
    n = 1 << 22
    eps = _gnm_eps(n).double()
    bound = rho * kappa * 3 * sigma
    s = rho * kappa * sigma
    assert float(eps.abs().max()) <= bound * (1 + 1e-6)
    # clamping N(0, 1) at +-3: Var = 1 - 2 Q(3) - 6 phi(3) + 18 Q(3), std 0.99750 (not 1, nor the
    # 0.9866 of truncation); the std estimate's relative s.e. is ~1/sqrt(2n) = 3.5e-4, allow 4 s.e.
    q3 = 0.5 * math.erfc(3 / math.sqrt(2))
    phi3 = math.exp(-4.5) / math.sqrt(2 * math.pi)
    std_ratio = math.sqrt(1 - 2 * q3 - 6 * phi3 + 18 * q3)
    assert std_ratio == pytest.approx(0.99750, abs=1e-5)
    assert float(eps.std()) / s == pytest.approx(std_ratio, abs=4 / math.sqrt(2 * n))
    # mean 0 within 5 s.e. (s / sqrt(n))
    assert abs(float(eps.mean())) < 5 * s / math.sqrt(n)
    # 2 Q(3) = 0.270 % on the bound: binomial s.e. sqrt(p / n), allow 5 s.e.
    at_bound = float((eps.abs() >= bound * (1 - 1e-6)).double().mean())
    assert at_bound == pytest.approx(2 * q3, abs=5 * math.sqrt(2 * q3 / n))


def test_gnm_noise_decay_and_sigma_eff() -> None:
    full = _gnm_eps(1000, seed=7)
    half = _gnm_eps(1000, seed=7, factor=0.5)
    assert torch.equal(half, 0.5 * full)  # a power of two: exact
    opt = GNM(_params(), torch.optim.SGD, lr=0.1)
    assert opt.noise_factor == 1.0
    assert opt.sigma_eff == pytest.approx(0.05 * 0.1 / 3)
    opt.set_noise_factor(0.5)
    assert opt.noise_factor == 0.5 and opt.sigma_eff == pytest.approx(0.05 * 0.1 / 6)
    assert opt.state_dict()["sharpness"]["noise_factor"] == 0.5


def test_gnm_seed_determines_the_noise() -> None:
    assert torch.equal(_gnm_eps(100, seed=1), _gnm_eps(100, seed=1))
    assert not torch.equal(_gnm_eps(100, seed=1), _gnm_eps(100, seed=2))
    torch.manual_seed(0)
    a = _gnm_eps(100, seed=None)  # type: ignore[arg-type]
    torch.manual_seed(0)
    assert torch.equal(a, _gnm_eps(100, seed=None))  # type: ignore[arg-type]


def test_gnm_eps_does_not_depend_on_the_batch() -> None:
    # same seed, different data: the forward sees the same theta + eps, and eps is drawn before the forward
    a = _spd(7, 0)
    seen = []
    for data_seed in (0, 1):
        params = _params()
        opt = GNM(params, torch.optim.SGD, rho=0.5, seed=11, lr=0.1)
        x = torch.randn(7, generator=torch.Generator().manual_seed(data_seed))
        inside: list[Tensor] = []

        def closure(params: list[Tensor] = params, x: Tensor = x, inside: list[Tensor] = inside) -> Tensor:
            inside.append(torch.cat([p.detach() for p in params]))
            theta = torch.cat(params)
            loss = 0.5 * (theta - x) @ a @ (theta - x)
            loss.backward()
            return loss.detach()

        for _ in range(2):
            opt.zero_grad()
            opt.step(closure)
        seen.append(inside[0])
    assert torch.equal(seen[0], seen[1])


def test_gnm_update_rule() -> None:
    # theta' = theta - lr * (grad L(theta + eps) + wd * theta) with SGD, momentum 0; eps rebuilt from the seed
    a = _spd(7, 0, torch.float64)
    params = _params(dtype=torch.float64)
    theta = torch.cat([p.detach() for p in params])
    lr, wd, rho, kappa = 0.1, 1e-2, 0.5, 0.4
    opt = GNM(params, torch.optim.SGD, rho=rho, kappa=kappa, seed=3, lr=lr, momentum=0.0, weight_decay=wd)
    gen = torch.Generator().manual_seed(3)
    eps = torch.cat(
        [
            torch.randn(p.shape, generator=gen).mul(1 / 3).clamp(-1, 1).mul(rho * kappa).double()
            for p in params
        ]
    )
    _step(opt, Quadratic(params, a).closure)
    expected = theta - lr * (a @ (theta + eps) + wd * theta)
    torch.testing.assert_close(torch.cat([p.detach() for p in params]), expected, rtol=1e-12, atol=1e-12)


def test_gnm_perturbs_every_trainable_tensor_and_restores_all() -> None:
    used, unused = torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = GNM([used, unused], torch.optim.SGD, rho=1.0, kappa=1.0, seed=0, lr=0.1)
    opt.first_step()
    assert not torch.equal(unused, torch.zeros(4))  # perturbed even though it will get no grad
    (used**2).sum().backward()
    opt.second_step()
    assert torch.equal(unused, torch.zeros(4))
