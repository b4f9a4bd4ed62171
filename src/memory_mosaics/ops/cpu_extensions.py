"""Building the compiled CPU kernels (csrc/) on first use, and falling back when that cannot be done.

Each kernel is a C++ file compiled by PyTorch's extension builder the first time it is needed and
cached under torch's extension folder (`TORCH_EXTENSIONS_DIR`); a first build is announced with a
warning, since the step that needs it waits. When the build cannot happen — no compiler, no `ninja`,
an unwritable cache — `load` logs why at INFO and returns None, and callers keep their plain PyTorch
path. `MOSAIC_CPU_KERNEL=0` turns every compiled kernel off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
SOURCES = Path(__file__).resolve().parent / "csrc"


def enabled() -> bool:
    return os.environ.get("MOSAIC_CPU_KERNEL", "1") != "0"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def avx512_bf16_missing() -> str | None:
    """Why the bf16 read kernels cannot run on this CPU, checked before building them; None if they may (they
    round to bf16 with an AVX512-BF16 instruction, so without it they must not run at all). Whether the CPU
    also has AMX, the kernels' `supported()` says once built."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512" or "avx512_bf16" not in cpu_flags():
        return f"needs AVX-512 with BF16 (torch's CPU capability: {capability})"
    return None


def headers_flags(source: str) -> list[str]:
    """For a source that includes csrc/ headers, a define naming their contents: torch's builder rebuilds
    a kernel when its source or its flags change, not when a header it includes does, so the headers ride
    in the flags (and a kernel without them is not rebuilt when they change)."""
    text = (SOURCES / source).read_text()
    headers = sorted(header for header in SOURCES.glob("*.h") if f'#include "{header.name}"' in text)
    if not headers:
        return []
    digest = hashlib.sha256()
    for header in headers:
        digest.update(header.read_bytes())
    return [f"-DMOSAIC_HEADERS_{digest.hexdigest()[:16]}"]


def _built_before(name: str) -> bool:
    """Whether torch's extension folder already holds a build (then loading takes a moment)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # private: only for the message

        return any(Path(_get_build_directory(name, verbose=False)).glob("*.so"))
    except Exception:
        return False


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` wheel (a dependency) puts it in its own folder,
    which is on PATH only in an activated environment."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def load(name: str, source: str, flags: list[str], what: str, build_seconds: int):
    """Compile (once) and import csrc/`source` as module `name`, or None if it cannot be built.

    `what` names the kernel in messages; `build_seconds` is what a first build takes, for the warning.
    """
    try:
        from torch.utils.cpp_extension import load as build_and_import

        _put_ninja_on_path()
        if not _built_before(name):
            logger.warning("memory_mosaics: building the CPU kernel for %s (once; about %d s)", what, build_seconds)
        return build_and_import(
            name=name, sources=[str(SOURCES / source)], extra_cflags=[*flags, *headers_flags(source)], verbose=False
        )
    except Exception as error:  # no compiler, no ninja, unwritable cache: the caller keeps its plain path
        logger.info("CPU kernel for %s off: the build failed (%s)", what, str(error).splitlines()[0][:200])
        return None
