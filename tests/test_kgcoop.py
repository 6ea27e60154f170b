"""KgCoOp's regulariser: zero at the hand-written context, pulls back to it, seen by every optimizer."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_NAME
from tests.synthetic import synthetic_task
from trainer import runner
from trainer.config import OptimConfig, ReweightConfig, load_config
from trainer.data import tasks
from trainer.engine import train_step
from trainer.errors import UserError
from trainer.kgcoop import KgCoOpRegulariser, build_kg_regulariser
from trainer.optim import build_optimizer
from trainer.prompts import PromptedCLIP
from trainer.reweight import build_loss

NAMES = ["red", "green", "blue"]
TEMPLATE = "a photo of a {}."


def _model(tiny_clip, tiny_tokenizer) -> PromptedCLIP:
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=4, ctx_init="a photo of a")
    m.set_class_names(NAMES)
    return m


def _perturb(m: PromptedCLIP, scale: float, seed: int = 0) -> torch.Tensor:
    """Move ctx off the hand-written context by a seeded random delta; returns the hand-written ctx."""
    assert m.ctx is not None
    ctx0 = m.ctx.detach().clone()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.ctx.add_(scale * ctx0.norm() / ctx0.numel() ** 0.5 * torch.randn(ctx0.shape, generator=g))
    return ctx0


def _term(kg: KgCoOpRegulariser, m: PromptedCLIP) -> float:
    with torch.no_grad():
        return float(kg(m.encode_token_ids(m.class_tokens)))


def test_term_is_zero_at_the_handwritten_context(tiny_clip, tiny_tokenizer):
    m = _model(tiny_clip, tiny_tokenizer)
    kg = build_kg_regulariser(m, NAMES, TEMPLATE, weight=8.0)
    assert kg is not None
    text = m.encode_token_ids(m.class_tokens)
    assert torch.allclose(text, kg.reference, atol=1e-5)
    assert abs(float(kg(text).detach())) < 1e-5
    _perturb(m, 0.5)
    assert _term(kg, m) > 1e-3  # and not zero elsewhere


def test_gradient_points_back_to_the_handwritten_context(tiny_clip, tiny_tokenizer):
    m = _model(tiny_clip, tiny_tokenizer)
    kg = build_kg_regulariser(m, NAMES, TEMPLATE, weight=8.0)
    assert kg is not None and m.ctx is not None
    ctx0 = _perturb(m, 0.2)
    before_dist = float((m.ctx - ctx0).norm())
    term = kg(m.encode_token_ids(m.class_tokens))
    (grad,) = torch.autograd.grad(term, m.ctx)
    assert float(grad.norm()) > 0
    with torch.no_grad():  # a small step along -grad, a tenth of the distance
        m.ctx.sub_(0.1 * before_dist * grad / grad.norm())
    assert float((m.ctx - ctx0).norm()) < before_dist
    assert _term(kg, m) < float(term)
    assert torch.dot(-grad.flatten(), (ctx0 - m.ctx).flatten()) > 0  # -grad has a component towards ctx0


def test_regulariser_validates_its_inputs():
    with pytest.raises(ValueError, match="weight"):
        KgCoOpRegulariser(torch.ones(2, 4), weight=-1.0)
    kg = KgCoOpRegulariser(torch.ones(2, 4), weight=1.0)
    with pytest.raises(ValueError, match="other classes"):
        kg(torch.ones(3, 4))


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("name", ["sgd", "sam", "gnm", "gcsam"])
def test_every_optimizer_steps_on_the_term(tiny_clip, tiny_tokenizer, name):
    """The term is part of the loss of every pass: with it, one step lands nearer the hand-written context.

    (rho is a tenth of the distance to it: SAM's ascent must not jump past the hand-written context.)
    """
    dists, outs = [], []
    for weight in (0.0, 8.0):
        m = _model(tiny_clip, tiny_tokenizer)
        ctx0 = _perturb(m, 0.3)
        kg = build_kg_regulariser(m, NAMES, TEMPLATE, weight=weight)
        rho = 0.1 * float((m.ctx - ctx0).norm()) if m.ctx is not None else None
        opt = build_optimizer(
            [m.ctx], OptimConfig(name=name, lr=1e-3, weight_decay=0.0, momentum=0.0, rho=rho), seed=0
        )
        out = train_step(
            m, [_batch()], build_loss(ReweightConfig(), [2, 2, 2], start_epoch=0), opt, regulariser=kg
        )
        assert m.ctx is not None
        dists.append(float((m.ctx - ctx0).norm()))
        outs.append(out)
    assert dists[1] < dists[0]
    assert outs[0].regulariser is None and outs[1].regulariser is not None and outs[1].regulariser > 0
    if name != "gnm":  # GNM's reported loss is at theta + eps
        assert outs[1].loss == pytest.approx(outs[0].loss + outs[1].regulariser, rel=1e-5)


def test_config_default_off_and_needs_a_context():
    assert load_config(None, []).loss.kg_weight == 0.0
    with pytest.raises(UserError, match="kg_weight"):
        load_config(None, ["loss.kg_weight=8", "prompt.n_ctx=0"])


def test_fit_logs_the_distance(tmp_path, monkeypatch, tiny_clip):
    monkeypatch.setattr(tasks, "task_from_config", lambda *args, **kwargs: synthetic_task())
    cfg = load_config(
        None,
        [
            f"model.name={TINY_NAME}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.epochs=1",
            "data.batch_size=4",
            "prompt.vpt_length=0",
            "optim.name=gcsam",
            "loss.kg_weight=8",
            "train.device=cpu",
        ],
    )
    runner.fit(cfg, progress=False)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < record["kg_distance"] < 2


@pytest.mark.parametrize(
    "name", ["kgcoop_base2novel.yaml", "gcsam_kgcoop_base2novel.yaml", "toy_kgcoop_base2novel.yaml"]
)
def test_kgcoop_recipes_use_its_weight_on_a_text_context(name):
    from pathlib import Path

    from trainer.kgcoop import KGCOOP_WEIGHT

    cfg = load_config(Path(__file__).resolve().parents[1] / "recipes" / name)
    assert cfg.loss.kg_weight == KGCOOP_WEIGHT == 8.0
    assert cfg.prompt.n_ctx == 4 and cfg.prompt.ctx_init == "a photo of a" and cfg.prompt.vpt_length == 0
    assert "{}" in cfg.prompt.template
