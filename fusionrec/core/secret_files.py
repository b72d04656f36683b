"""Secrets generated once and kept in a file only its owner can read (the embedded services' run dir)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fusionrec.core.errors import ConfigError


def secret_in(path: Path, min_length: int = 16) -> str:
    """The secret in ``path``, generating it (64 hex characters, mode 0600) when the file is absent.

    It is written whole under a name of its own and then linked into place, so processes starting at
    the same moment either win the link or read the complete file of the one that did.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    value = path.read_text().strip()
    if len(value) < min_length:
        raise ConfigError(f"{path} holds no secret of at least {min_length} characters; delete it to generate one")
    return value
