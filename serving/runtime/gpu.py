"""CUDA / cuDNN libraries for onnxruntime-gpu without torch: load them before the first session.

``onnxruntime-gpu[cuda,cudnn]`` brings CUDA and cuDNN as pip wheels (``nvidia-*`` packages under
``site-packages/nvidia/*/lib``), which the dynamic loader does not search. In a process that imported
torch they are already loaded (torch loads the same wheels); the serving image has no torch, so without a
preload the CUDA provider fails to load and onnxruntime silently falls back to the CPU. onnxruntime
documents :func:`onnxruntime.preload_dlls` (1.21+) for exactly this: :func:`preload_gpu_libraries` calls it
once, then reads ``/proc/self/maps`` to say which libraries were loaded from where, and names the missing
ones with the fix.

:func:`cuda_versions` reports the CUDA runtime and cuDNN versions really loaded (from the libraries
themselves), or the ones the onnxruntime build was made for when nothing is loaded; the service exports
them as labels of ``flatprompt_model_info``.

Torch-free, like the rest of :mod:`serving.runtime`.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
# the libraries the CUDA provider needs (sonames without their major suffix)
REQUIRED_LIBRARIES = ("libcudart", "libcublas", "libcublasLt", "libcudnn", "libcufft", "libcurand")
_FIX = (
    "install the GPU stack the Bento pins (pip install 'onnxruntime-gpu[cuda,cudnn]==<pinned>', see "
    "bentofile.yaml), or put a system CUDA / cuDNN of the same majors on LD_LIBRARY_PATH"
)
_SONAME = re.compile(r"/(lib(?:cudart|cublasLt|cublas|cudnn|cufft|curand))\.so[.\d]*$")


class GpuLibraryError(RuntimeError):
    """The CUDA provider cannot run: a library it needs is not loadable. The message names it and the fix."""


@dataclass(frozen=True)
class PreloadReport:
    """What :func:`preload_gpu_libraries` did.

    ``status``: ``loaded`` (every required library is in the process), ``incomplete`` (some are missing:
    ``missing``), ``cpu_build`` (onnxruntime without CUDA: nothing to do), ``unsupported`` (an onnxruntime
    older than 1.21 without ``preload_dlls``: the system loader's paths are used as they are).
    ``libraries`` maps each loaded library to its file.
    """

    status: str
    libraries: dict[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status in ("loaded", "cpu_build", "unsupported")

    def reason(self) -> str:
        """One line for the log and for ``/readyz``: what is missing and the fix ('' when nothing is)."""
        if not self.missing:
            return ""
        return f"CUDA libraries not found: {', '.join(self.missing)}; {_FIX}"


def loaded_libraries(maps: Iterable[str] | None = None) -> dict[str, str]:
    """CUDA / cuDNN libraries mapped into this process: ``{"libcudart": "/…/libcudart.so.12", ...}``."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text().splitlines()
        except OSError:  # not Linux
            return {}
    out: dict[str, str] = {}
    for line in maps:
        path = line.split()[-1] if line.split() else ""
        m = _SONAME.search(path)
        if m and m.group(1) not in out:
            out[m.group(1)] = path
    return out


def preload_gpu_libraries(
    preload: Callable[..., Any] | None = None,
    available: Callable[[], list[str]] | None = None,
    maps: Callable[[], dict[str, str]] | None = None,
) -> PreloadReport:
    """Load CUDA and cuDNN for onnxruntime-gpu (``onnxruntime.preload_dlls``) and report what is loaded.

    A no-op on a CPU-only onnxruntime. Call it before the first ``InferenceSession`` (``Bundle.load`` does,
    when CUDA is among the requested providers). ``preload`` / ``available`` / ``maps`` are injectable for
    tests (defaults: onnxruntime's own functions and ``/proc/self/maps``).
    """
    import onnxruntime as ort

    maps = maps or loaded_libraries
    providers = (available or ort.get_available_providers)()
    if CUDA not in providers:
        return PreloadReport("cpu_build")
    fn = preload if preload is not None else getattr(ort, "preload_dlls", None)
    if fn is None:
        _logger.info("onnxruntime %s has no preload_dlls (1.21+): using the loader's paths", ort.__version__)
        return PreloadReport("unsupported", maps())
    try:
        # directory=None: onnxruntime's documented search order (torch's copies when torch is loaded, then
        # the nvidia-* wheels in site-packages, then the loader's default paths)
        fn(cuda=True, cudnn=True, msvc=False, directory=None)
    except Exception as e:  # onnxruntime raises OSError / RuntimeError variants here
        _logger.warning("onnxruntime.preload_dlls failed: %s", e)
    libs = maps()
    missing = tuple(name for name in REQUIRED_LIBRARIES if name not in libs)
    report = PreloadReport("incomplete" if missing else "loaded", libs, missing)
    if missing:
        _logger.error("%s", report.reason())
    else:
        _logger.info(
            "CUDA libraries loaded: %s",
            ", ".join(f"{Path(p).name} from {Path(p).parent}" for p in libs.values()),
        )
    return report


def _call_version(path: str, symbol: str, by_pointer: bool) -> int | None:
    try:
        lib = ctypes.CDLL(path)
        fn = getattr(lib, symbol)
    except (OSError, AttributeError):
        return None
    if by_pointer:  # cudaError_t cudaRuntimeGetVersion(int *)
        value = ctypes.c_int(0)
        fn.argtypes = [ctypes.POINTER(ctypes.c_int)]
        fn.restype = ctypes.c_int
        return int(value.value) if fn(ctypes.byref(value)) == 0 else None
    fn.restype = ctypes.c_size_t  # size_t cudnnGetVersion(void)
    return int(fn())


def _dotted(version: int | None, scheme: str) -> str:
    if not version:
        return ""
    if scheme == "cuda":  # 12090 -> 12.9
        return f"{version // 1000}.{(version % 1000) // 10}"
    return f"{version // 10000}.{(version % 10000) // 100}.{version % 100}"  # cuDNN 9: 90800 -> 9.8.0


def cuda_versions(libs: dict[str, str] | None = None) -> dict[str, str]:
    """``{"cuda": "12.9", "cudnn": "9.10.2", "source": "loaded" | "build" | "none"}``.

    From the libraries loaded in the process when there are any, else the versions the onnxruntime build
    names (``onnxruntime.capi.build_and_package_info``), else empty strings (CPU build).
    """
    libs = loaded_libraries() if libs is None else libs
    cuda = (
        _dotted(_call_version(libs["libcudart"], "cudaRuntimeGetVersion", True), "cuda")
        if "libcudart" in libs
        else ""
    )
    cudnn = (
        _dotted(_call_version(libs["libcudnn"], "cudnnGetVersion", False), "cudnn")
        if "libcudnn" in libs
        else ""
    )
    if cuda or cudnn:
        return {"cuda": cuda, "cudnn": cudnn, "source": "loaded"}
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        return {"cuda": "", "cudnn": "", "source": "none"}
    cuda = str(getattr(info, "cuda_version", "") or "")
    cudnn = str(getattr(info, "cudnn_version", "") or "")
    return {"cuda": cuda, "cudnn": cudnn, "source": "build" if cuda or cudnn else "none"}
