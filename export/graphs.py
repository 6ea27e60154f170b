"""torch -> ONNX for the two towers of a :class:`trainer.prompts.PromptedCLIP`, and the fp16 conversion.

- ``image_encoder.onnx``: ``pixels`` float32 ``[N, 3, S, S]`` -> ``embeddings`` float32 ``[N, E]``
  (``PromptedCLIP.encode_image``: visual prompts baked in, L2-normalised);
- ``text_encoder.onnx``: ``token_ids`` int64 ``[N, L]`` -> ``embeddings`` float32 ``[N, E]``
  (``PromptedCLIP.encode_token_ids``: the learned context overwrites positions 1..M via mask + where);
- ``text_encoder_handwritten.onnx`` (prompt-tuned models): the same without the learned context, the frozen
  text tower over the hand-written prompt's ids (``encode_token_ids(..., learned=False)``).

The batch axis is dynamic. Export happens in fp32 on the CPU (a CUDA/half model gives mixed-dtype graphs);
fp16 files are converted afterwards with ``keep_io_types=True`` (inputs and outputs stay float32).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import UserError

_logger = logging.getLogger(__name__)

EXPORTERS = ("auto", "dynamo", "torchscript")
DEFAULT_OPSET = 18
MIN_OPSET = 17
PROTOBUF_LIMIT = 2_000_000_000  # bytes: larger graphs need external data files


class GraphExportError(Exception):
    """No exporter produced a graph (the messages of each attempt are joined)."""


class ImageTower(nn.Module):
    """``pixels -> embeddings`` of a PromptedCLIP (visual prompts included)."""

    def __init__(self, prompted: nn.Module) -> None:
        super().__init__()
        self.prompted = prompted

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.prompted.encode_image(pixels)  # type: ignore[operator]


class TextTower(nn.Module):
    """``token_ids -> embeddings`` of a PromptedCLIP (learned context included unless ``learned`` is False)."""

    def __init__(self, prompted: nn.Module, learned: bool = True) -> None:
        super().__init__()
        self.prompted = prompted
        self.learned = learned

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.prompted.encode_token_ids(token_ids, learned=self.learned)  # type: ignore[operator]


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def export_tower(
    tower: nn.Module,
    example: torch.Tensor,
    input_name: str,
    path: Path,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
) -> str:
    """Export one tower to ``path`` with a dynamic batch axis; returns the exporter actually used.

    ``auto`` tries the dynamo exporter (``torch.onnx.export(dynamo=True)``) and falls back to the
    TorchScript one if dynamo fails (logged); parity checks afterwards catch a wrong graph either way.
    Graphs over 2 GB are written with external data (extra files next to ``path``, listed in the manifest).
    """
    if exporter not in EXPORTERS:
        raise UserError(f"exporter '{exporter}' is not one of {EXPORTERS}")
    if opset < MIN_OPSET:
        raise UserError(
            f"opset {opset} is too old: use --opset {MIN_OPSET} or newer (default {DEFAULT_OPSET})"
        )
    tower = tower.eval()
    external = _param_bytes(tower) > PROTOBUF_LIMIT * 0.9
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    errors: list[str] = []
    for kind in order:
        try:
            _export(tower, example, input_name, path, opset, kind, external)
            return kind
        except UserError:
            raise
        except Exception as e:  # exporter failures come in many types
            errors.append(f"{kind}: {type(e).__name__}: {str(e)[:300]}")
            _logger.warning("%s export of %s failed: %s", kind, path.name, errors[-1])
            for leftover in (path, path.with_name(path.name + ".data")):
                leftover.unlink(missing_ok=True)
    raise GraphExportError(f"could not export {path.name} to ONNX ({'; '.join(errors)})")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, INFO logs and deprecation warnings (kept at DEBUG)."""
    noisy = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in noisy]
    buf = io.StringIO()
    # nn.MultiheadAttention's inference fast path (aten::_native_multi_head_attention) has no ONNX export
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for lg in noisy:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)
        if buf.getvalue():
            _logger.debug("exporter output:\n%s", buf.getvalue())


def _export(
    tower: nn.Module,
    example: torch.Tensor,
    input_name: str,
    path: Path,
    opset: int,
    kind: str,
    external: bool,
) -> None:
    with torch.no_grad(), _quiet():
        if kind == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            program = torch.onnx.export(
                tower,
                (example,),
                None,
                input_names=[input_name],
                output_names=["embeddings"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
            )
            if program is None:
                raise RuntimeError("torch.onnx.export returned no program")
            program.save(str(path), external_data=external)
        else:
            torch.onnx.export(
                tower,
                (example,),
                str(path),
                input_names=[input_name],
                output_names=["embeddings"],
                opset_version=opset,
                dynamo=False,
                dynamic_axes={input_name: {0: "batch"}, "embeddings": {0: "batch"}},
                do_constant_folding=True,
            )
    _logger.info("exported %s with the %s exporter (opset %d)", path.name, kind, opset)


def check_graph(path: Path) -> dict[str, object]:
    """``onnx.checker`` on the saved file; returns a short description (opset, inputs, outputs, nodes)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise RuntimeError(f"{path.name} fails the ONNX checker: {e}") from e
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}

    def dims(v: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {
        "opset": opsets.get("ai.onnx"),
        "inputs": {i.name: dims(i) for i in model.graph.input},
        "outputs": {o.name: dims(o) for o in model.graph.output},
        "nodes": len(model.graph.node),
    }


def convert_fp16(src: Path, dst: Path) -> None:
    """fp32 graph -> fp16 graph with float32 inputs/outputs (``keep_io_types=True``), for CUDA."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True)
    external = half.ByteSize() > PROTOBUF_LIMIT * 0.9
    onnx.save(
        half, str(dst), save_as_external_data=external, location=dst.name + ".data" if external else None
    )
    _logger.info("converted %s -> %s (fp16, float32 IO)", src.name, dst.name)
