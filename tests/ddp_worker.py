"""Entry point of one DDP rank for tests/test_engine.py (run with 2 gloo processes on CPU)."""

from __future__ import annotations

import os
import sys

import torch


def main() -> None:
    out_dir, optim_name, conf = sys.argv[1], sys.argv[2], sys.argv[3]
    from tests.synthetic import synthetic_task
    from trainer import engine, runner
    from trainer.config import load_config
    from trainer.data import tasks
    from trainer.models import register_model_config

    register_model_config(conf)
    tasks.task_from_config = lambda data, problems=None: synthetic_task((16, 8, 8), novel=False)  # type: ignore[assignment]
    rank = int(os.environ["RANK"])
    cfg = load_config(
        None,
        [
            "model.name=tiny-clip",
            f"train.out_dir={out_dir}",
            f"optim.name={optim_name}",
            "optim.lr=0.05",
            "train.epochs=2",
            "data.batch_size=4",
            "prompt.vpt_length=2",
            "prompt.ctx_init=null",
            "train.device=cpu",
        ],
    )
    torch.manual_seed(0)  # identical frozen random-init CLIP on every rank
    seen: list[dict[str, torch.Tensor]] = []
    original = engine.train_step

    def spy(model, *args, **kwargs):  # record the prompts after every optimizer step on every rank
        out = original(model, *args, **kwargs)
        module = model.module if hasattr(model, "module") else model
        seen.append({k: v.detach().clone() for k, v in module.trainable_state_dict().items()})
        return out

    engine.train_step = spy  # type: ignore[assignment]
    runner.fit(cfg, progress=False)
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
