"""The training step, fit / resume / crash safety, AMP order, and DDP with two gloo processes."""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_CONFIG, TINY_NAME
from tests.synthetic import synthetic_task
from trainer import runner
from trainer.checkpoint import load_prompted, read_checkpoint
from trainer.config import OptimConfig, ReweightConfig, load_config
from trainer.data import tasks
from trainer.engine import train_step, warmup_cosine
from trainer.errors import UserError
from trainer.optim import build_optimizer
from trainer.prompts import PromptedCLIP
from trainer.reweight import build_loss

OPTIMIZERS = ["sgd", "adamw", "sam", "asam", "gnm", "gcsam"]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(
        None,
        [
            f"model.name={TINY_NAME}",
            f"train.out_dir={tmp_path / 'run'}",
            "train.epochs=2",
            "data.batch_size=4",
            "prompt.vpt_length=2",
            "prompt.ctx_init=null",
            "optim.lr=0.05",
            "train.device=cpu",
            *extra,
        ],
    )


@pytest.fixture
def synthetic(monkeypatch, tiny_clip):
    monkeypatch.setattr(tasks, "task_from_config", lambda data, problems=None: synthetic_task())


def _prompted(tiny_clip, tiny_tokenizer, seed=0):
    torch.manual_seed(seed)
    m = PromptedCLIP(tiny_clip.model, tiny_tokenizer, n_ctx=2, ctx_init=None, vpt_length=2)
    m.set_class_names(["red", "green", "blue"])
    return m


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_power_of_two_loss_scale_changes_nothing(tiny_clip, tiny_tokenizer, name):
    """scale -> backward -> (first_step with g / S) -> unscale -> restore -> step equals the fp32 step."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        m = _prompted(tiny_clip, tiny_tokenizer)
        opt = build_optimizer(
            [p for p in m.parameters() if p.requires_grad],
            OptimConfig(name=name, lr=0.1, weight_decay=0.0),
            seed=0,
        )
        loss_fn = build_loss(ReweightConfig(), [2, 2, 2], start_epoch=0)
        for step in range(2):
            train_step(m, [_batch(step)], loss_fn, opt, scaler=scaler)
        results.append(m.trainable_state_dict())
    for key in results[0]:
        assert torch.allclose(results[0][key], results[1][key], atol=1e-6, rtol=1e-5), key


@pytest.mark.parametrize("name", ["sgd", "sam", "gnm", "gcsam"])
def test_overflowing_scale_skips_step_and_restores(tiny_clip, tiny_tokenizer, name):
    m = _prompted(tiny_clip, tiny_tokenizer)
    before = m.trainable_state_dict()
    opt = build_optimizer(
        [p for p in m.parameters() if p.requires_grad],
        OptimConfig(name=name, lr=0.1, weight_decay=0.0),
        seed=0,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    out = train_step(
        m, [_batch()], build_loss(ReweightConfig(), [2, 2, 2], start_epoch=0), opt, scaler=scaler
    )
    assert out.skipped
    assert scaler.get_scale() < 2.0**127
    for key, value in m.trainable_state_dict().items():
        assert torch.equal(value, before[key]), key  # theta restored exactly, no update


def test_two_pass_refuses_accumulation(tiny_clip, tiny_tokenizer):
    m = _prompted(tiny_clip, tiny_tokenizer)
    opt = build_optimizer(
        [p for p in m.parameters() if p.requires_grad], OptimConfig(name="sam", lr=0.1, weight_decay=0.0)
    )
    with pytest.raises(ValueError, match="accumulation"):
        train_step(m, [_batch(0), _batch(1)], build_loss(ReweightConfig(), [2, 2, 2], start_epoch=0), opt)


def test_accumulation_equals_big_batch(tiny_clip, tiny_tokenizer):
    images, labels = _batch(0)
    states = []
    for micro in ([(images, labels)], [(images[:3], labels[:3]), (images[3:], labels[3:])]):
        m = _prompted(tiny_clip, tiny_tokenizer)
        opt = build_optimizer(
            [p for p in m.parameters() if p.requires_grad], OptimConfig(name="sgd", lr=0.1, weight_decay=0.0)
        )
        train_step(m, micro, build_loss(ReweightConfig(), [2, 2, 2], start_epoch=0), opt)
        states.append(m.trainable_state_dict())
    for key in states[0]:
        assert torch.allclose(states[0][key], states[1][key], atol=1e-6), key


def test_grad_clip_acts_on_final_gradient(tiny_clip, tiny_tokenizer):
    m = _prompted(tiny_clip, tiny_tokenizer)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = build_optimizer(params, OptimConfig(name="sam", lr=1.0, weight_decay=0.0, momentum=0.0))
    before = [p.detach().clone() for p in params]
    train_step(m, [_batch()], build_loss(ReweightConfig(), [2, 2, 2], start_epoch=0), opt, grad_clip=1e-3)
    step_norm = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before, strict=True)))
    assert step_norm <= 1e-3 * (1 + 1e-4)


def test_warmup_cosine_shape():
    f = warmup_cosine(100, 10)
    assert f(0) < f(5) < f(9) <= 1.0
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=1e-6)
    assert f(100) == pytest.approx(0.0, abs=1e-9)


def test_fit_resume_is_exact(tmp_path, synthetic, monkeypatch):
    extra = ("optim.name=gnm", "reweight.name=drw", "reweight.start_epoch=1")
    full = runner.fit(_cfg(tmp_path / "a", *extra), progress=False)
    original = runner.train_one_epoch
    calls = {"n": 0}

    def stop_after_first_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "train_one_epoch", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        runner.fit(_cfg(tmp_path / "b", *extra), progress=False)
    assert read_checkpoint(tmp_path / "b" / "run").epoch == 1
    monkeypatch.setattr(runner, "train_one_epoch", original)
    resumed = runner.fit(_cfg(tmp_path / "b", *extra), progress=False)
    a = read_checkpoint(full.out_dir)
    b = read_checkpoint(resumed.out_dir)
    assert a.epoch == b.epoch == 2
    for key in a.prompt_state:
        assert torch.equal(a.prompt_state[key], b.prompt_state[key]), key
    assert full.final == resumed.final


def test_resume_refuses_a_changed_config(tmp_path, synthetic):
    """A rerun into a folder whose checkpoint was trained differently is refused (naming the fields), and
    nothing there is touched; changing only where / how often it evaluates still resumes."""
    first = runner.fit(_cfg(tmp_path, "train.epochs=1"), progress=False)
    ckpt, config_yaml = first.out_dir / "checkpoint.pt", first.out_dir / "config.yaml"
    before = (ckpt.read_bytes(), config_yaml.read_text())
    with pytest.raises(UserError, match="--out NEW_DIR") as err:
        runner.fit(_cfg(tmp_path, "train.epochs=1", "reweight.name=drw", "optim.name=gnm"), progress=False)
    assert "optim.name: 'sgd' -> 'gnm'" in str(err.value) and "reweight.name: 'none' -> 'drw'" in str(
        err.value
    )
    assert (ckpt.read_bytes(), config_yaml.read_text()) == before
    again = runner.fit(
        _cfg(tmp_path, "train.epochs=1", "train.eval_every=5", "data.eval_batch_size=7"), progress=False
    )
    # resumed the finished run: no training, the same numbers (up to the summation order of the new batch size)
    assert again.final.keys() == first.final.keys()
    for key, value in first.final.items():
        assert again.final[key] == (pytest.approx(value, abs=1e-6) if value is not None else None), key
    assert read_checkpoint(ckpt).epoch == 1
    fresh = runner.fit(
        _cfg(tmp_path, "train.epochs=1", "reweight.name=drw", "train.resume=false"), progress=False
    )
    assert read_checkpoint(ckpt).config["reweight"]["name"] == "drw" and fresh.final


def test_resume_refuses_other_data_or_weights(tmp_path, synthetic, monkeypatch):
    """Same config, but the data or the model weights behind it changed (a new toy world, a moved dataset
    with other counts, another weights file): refused, not resumed on top of the old prompts."""
    first = runner.fit(_cfg(tmp_path, "train.epochs=1"), progress=False)
    ckpt_path = first.out_dir / "checkpoint.pt"
    monkeypatch.setattr(tasks, "task_from_config", lambda data, problems=None: synthetic_task((12, 6, 4)))
    with pytest.raises(UserError, match="training images per class"):
        runner.fit(_cfg(tmp_path, "train.epochs=1"), progress=False)
    monkeypatch.setattr(tasks, "task_from_config", lambda data, problems=None: synthetic_task())
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["identity"]["pretrained"] = "/elsewhere/weights.pt"
    torch.save(ckpt, ckpt_path)
    with pytest.raises(UserError, match=re.escape("model weights '/elsewhere/weights.pt' -> None")):
        runner.fit(_cfg(tmp_path, "train.epochs=1"), progress=False)


def test_fresh_start_and_resume_leave_one_line_per_epoch(tmp_path, synthetic):
    """train.resume=false starts the folder over (no metrics or outputs of the previous run left); a resume
    drops metric lines past the checkpoint (a crash between the metrics line and the checkpoint)."""
    run = runner.fit(_cfg(tmp_path, "train.epochs=1"), progress=False).out_dir
    runner.fit(_cfg(tmp_path, "train.epochs=1", "reweight.name=drw", "train.resume=false"), progress=False)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1]
    two_epochs = runner.fit(_cfg(tmp_path / "b", "train.epochs=2"), progress=False).out_dir
    metrics = two_epochs / "metrics.jsonl"
    before = metrics.read_text().splitlines()
    ckpt = torch.load(two_epochs / "checkpoint.pt", weights_only=False)
    ckpt["epoch"] = 1  # as if the process died after writing epoch 2's line, before its checkpoint
    torch.save(ckpt, two_epochs / "checkpoint.pt")
    runner.fit(_cfg(tmp_path / "b", "train.epochs=2"), progress=False)
    after = metrics.read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in after] == [1, 2]
    assert after[0] == before[0]


def test_interrupted_run_keeps_last_good_checkpoint(tmp_path, synthetic, monkeypatch):
    cfg = _cfg(tmp_path, "train.epochs=3")
    calls = {"n": 0}
    original = runner.train_one_epoch

    def crash_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "train_one_epoch", crash_in_second_epoch)
    with pytest.raises(RuntimeError, match="simulated"):
        runner.fit(cfg, progress=False)
    ck = read_checkpoint(Path(cfg.train.out_dir))
    assert ck.epoch == 1
    leftovers = [p.name for p in Path(cfg.train.out_dir).iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_checkpoint_is_self_describing(tmp_path, synthetic):
    result = runner.fit(_cfg(tmp_path, "train.epochs=1"), progress=False)
    run = load_prompted(result.out_dir / "checkpoint.pt")
    assert run.class_names == ["red", "green", "blue"]
    assert run.class_counts == [12, 6, 3]
    assert run.novel_class_names == ["yellow", "purple"]
    assert run.identity.name == TINY_NAME
    assert run.model.spec()["vpt_length"] == 2
    lines = (result.out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"eval"' in lines[0]
    assert {"many", "medium", "few", "novel", "hm"} <= set(result.final)
    assert result.zero_shot is not None


def test_corrupt_checkpoint_is_a_user_error(tmp_path, synthetic):
    result = runner.fit(_cfg(tmp_path, "train.epochs=1"), progress=False)
    path = result.out_dir / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt"):
        load_prompted(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sgd", "sam", "gnm", "gcsam"])
def test_ddp_two_gloo_ranks_stay_identical(tmp_path, name):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ddp_worker", str(tmp_path), name, str(TINY_CONFIG)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    # 32 images, 2 ranks x batch 4, 2 epochs: 4 steps per epoch on each rank
    assert len(r0) == len(r1) == 8
    for step, (e0, e1) in enumerate(zip(r0, r1, strict=True)):
        for key in e0:
            assert torch.equal(e0[key], e1[key]), (name, step, key)
    # the ranks did train: the prompts moved at every step
    for before, after in itertools.pairwise(r0):
        assert any(not torch.equal(before[k], after[k]) for k in before), name


def test_checkpoint_carries_its_model_config(tmp_path, synthetic):
    """A run on a config JSON registered at run time still loads when that file is gone (another machine)."""
    import shutil

    conf = tmp_path / "moved" / f"{TINY_NAME}.json"
    conf.parent.mkdir()
    shutil.copy(TINY_CONFIG, conf)
    result = runner.fit(_cfg(tmp_path, "train.epochs=1", f"model.config_path={conf}"), progress=False)
    shutil.rmtree(conf.parent)
    run = load_prompted(result.out_dir / "checkpoint.pt")
    assert run.identity.config_path == str(conf)
    assert run.model.spec()["n_ctx"] == 4
