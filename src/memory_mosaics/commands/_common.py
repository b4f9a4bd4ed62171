"""Small helpers shared by the subcommands."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from memory_mosaics.errors import MosaicError


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write `payload` as indented JSON, atomically (a temporary file renamed into place)."""
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise MosaicError(f"cannot write {target}: folder {target.parent} does not exist")
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise MosaicError(f"cannot write {target}: {err.strerror or err}") from err


def check_writable(path: str | os.PathLike[str], flag: str) -> None:
    """Fail before the work, not after it: the folder of an output file must exist and take a file."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise MosaicError(f"cannot write {flag} {path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mosaic-probe-"):
            pass
    except OSError as err:
        raise MosaicError(f"cannot write {flag} {path}: {err.strerror or err}") from err
