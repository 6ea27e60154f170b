"""Where a model's weights come from, found before anything is loaded or downloaded.

:func:`locate_weights` answers, for ``model.name`` + ``model.pretrained``: a local file, the packaged toy
checkpoint, a file already in the hub cache (open_clip's Hugging Face repo, or its URL cache for tags without
one), a download of N MB, or *unavailable* with a one-line reason. It reads the cache without network, and
asks the hub for the file's size at most once per candidate file, with a short timeout and no retries; under
``HF_HUB_OFFLINE=1`` it never asks and says so. :func:`trainer.models.load_clip` calls it before open_clip
does, so a missing weights file on an offline machine fails in milliseconds, not after the hub client's
retries (five, about 50 s), and ``python -m trainer check`` prints its answer.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from trainer.errors import UserError, shorten

WeightsKind = Literal["none", "packaged", "local", "cache", "download", "unavailable"]

# open_clip's names (open_clip.constants): the default file of a hub repo and its safetensors alternative
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"
URL_CACHE = Path("~/.cache/clip")  # open_clip's download_pretrained_from_url default
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class WeightsSource:
    """The answer of :func:`locate_weights`."""

    kind: WeightsKind
    detail: str  # one line: where from, or why not
    path: str | None = None  # the local / cached file
    size_bytes: int | None = None  # file size, or the download's size when the hub said
    offline: bool = False  # HF_HUB_OFFLINE is set: the hub was not asked

    @property
    def available(self) -> bool:
        return self.kind != "unavailable"

    def describe(self) -> str:
        size = f" ({format_bytes(self.size_bytes)})" if self.size_bytes is not None else ""
        if self.kind == "download":
            return f"a download of {format_bytes(self.size_bytes) if self.size_bytes else 'unknown size'} ({self.detail})"
        if self.kind in ("local", "cache", "packaged"):
            return f"{self.detail}{size}"
        return self.detail


def format_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / 1e6:.1f} MB"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, as the hub client reads it."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:
        pass
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"}


_FIX = "set model.pretrained to a local weights file (--set model.pretrained=/path/to/weights.pt)"


def locate_weights(
    name: str, pretrained: str | None, *, probe: bool = True, timeout: float = PROBE_TIMEOUT_S
) -> WeightsSource:
    """Where the weights of ``name`` / ``pretrained`` would come from (see the module docstring).

    Args:
        name: the open_clip model name.
        pretrained: a hub tag, a local file, or None (random init).
        probe: ask the hub for the size of a file that is not cached (one request per candidate file, no
            retries); False answers "download" without asking.
        timeout: seconds per request.
    """
    from trainer.models import TOY_MODEL_CHECKPOINT, TOY_MODEL_NAME

    if pretrained is None:
        if name == TOY_MODEL_NAME:
            return _file("packaged", TOY_MODEL_CHECKPOINT, "the packaged toy CLIP")
        return WeightsSource("none", "none: random init (model.pretrained is null)")
    if looks_like_path(pretrained) or Path(pretrained).exists():
        path = Path(pretrained).expanduser()
        if not path.is_file():
            return WeightsSource(
                "unavailable",
                f"checkpoint {path} does not exist: fix model.pretrained (--set model.pretrained=FILE)",
            )
        return _file("local", path, "local file")
    import open_clip

    if name not in open_clip.list_models():
        return WeightsSource(
            "unavailable",
            f"unknown open_clip model '{name}': use one of open_clip.list_models() (--set model.name=ViT-B-16) "
            "or pass its JSON (--set model.config_path=FILE)",
        )
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        return WeightsSource(
            "unavailable",
            f"'{pretrained}' is neither a file nor a pretrained tag of '{name}' (tags: {', '.join(tags) or 'none'}): "
            f"{_FIX}, or --set model.pretrained=TAG",
        )
    if "file" in cfg:
        return _file("local", Path(cfg["file"]), f"open_clip tag '{pretrained}' file")
    offline = hub_offline()
    hub = cfg.get("hf_hub", "")
    if hub and _has_hf_hub():
        return _locate_hub(hub, offline=offline, probe=probe, timeout=timeout)
    url = cfg.get("url", "")
    if url:
        return _locate_url(url, offline=offline, probe=probe, timeout=timeout)
    return WeightsSource("unavailable", f"tag '{pretrained}' of '{name}' names no file: {_FIX}")


def _file(kind: WeightsKind, path: Path, what: str) -> WeightsSource:
    if not path.is_file():
        return WeightsSource("unavailable", f"{what} {path} is missing: {_FIX}")
    return WeightsSource(kind, f"{what} {path}", str(path), path.stat().st_size)


def _has_hf_hub() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def _hub_candidates(hub: str) -> tuple[str, list[str]]:
    """open_clip's order: ``org/repo/file`` (or ``org/repo/`` for the default file), safetensors first."""
    repo_id, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    candidates = []
    if filename == HF_WEIGHTS_NAME:
        candidates.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        candidates.append(filename[:-4] + ".safetensors")
    candidates.append(filename)
    return repo_id, candidates


def _locate_hub(hub: str, *, offline: bool, probe: bool, timeout: float) -> WeightsSource:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    repo_id, candidates = _hub_candidates(hub)
    for filename in candidates:
        cached = try_to_load_from_cache(repo_id, filename)
        if isinstance(cached, str) and os.path.isfile(cached):
            return WeightsSource(
                "cache", f"hub cache {cached}", cached, os.path.getsize(cached), offline=offline
            )
    where = f"{repo_id}/{candidates[-1]}"
    if offline:
        return WeightsSource(
            "unavailable",
            f"{where} is not in the hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set, so the hub "
            f"is not asked: unset HF_HUB_OFFLINE to download it, or {_FIX}",
            offline=True,
        )
    if not probe:
        return WeightsSource("download", f"from the hub, {where}")
    last: Exception | None = None
    for filename in candidates:
        try:
            meta = get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=timeout)
        except EntryNotFoundError as e:  # this candidate does not exist (e.g. no safetensors): try the next
            last = e
            continue
        except HfHubHTTPError as e:
            return WeightsSource(
                "unavailable", f"the hub refused {repo_id}/{filename} ({shorten(str(e), 160)}): {_FIX}"
            )
        except Exception as e:  # connection errors: one try, no retries
            return WeightsSource(
                "unavailable",
                f"{where} is not in the hub cache and the hub cannot be reached ({type(e).__name__}: "
                f"{shorten(str(e), 120)}; no retries): connect to download it, or {_FIX}",
            )
        return WeightsSource("download", f"from the hub, {repo_id}/{filename}", size_bytes=meta.size)
    return WeightsSource("unavailable", f"the hub has no {where} ({shorten(str(last), 120)}): {_FIX}")


def _locate_url(url: str, *, offline: bool, probe: bool, timeout: float) -> WeightsSource:
    target = URL_CACHE.expanduser() / os.path.basename(url)
    if target.is_file():
        return WeightsSource("cache", f"open_clip cache {target}", str(target), target.stat().st_size)
    if offline:
        return WeightsSource(
            "unavailable",
            f"{target} is not downloaded and HF_HUB_OFFLINE is set, so {url} is not asked: unset it, or {_FIX}",
            offline=True,
        )
    if not probe:
        return WeightsSource("download", f"from {url}")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
            size = r.headers.get("Content-Length")
    except (urllib.error.URLError, OSError, ValueError) as e:
        return WeightsSource(
            "unavailable",
            f"{target} is not downloaded and {url} cannot be reached ({shorten(str(e), 120)}; no retries): "
            f"connect to download it, or {_FIX}",
        )
    return WeightsSource("download", f"from {url}", size_bytes=int(size) if size else None)


def require_weights(name: str, pretrained: str | None) -> WeightsSource:
    """:func:`locate_weights`, raising :class:`UserError` (one line) when the weights cannot be had."""
    source = locate_weights(name, pretrained)
    if not source.available:
        raise UserError(f"weights of '{name}' ({pretrained}): {source.detail}")
    return source
