"""Small file helpers shared by code generation and the dispatch table."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_atomic(path: Path, content: str) -> None:
    """Write through a temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(content)
    tmp.replace(path)


def source_hash(source: str) -> str:
    """The hash that dispatch entries record for a generated module's source."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]
