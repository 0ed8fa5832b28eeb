"""Security knobs: mutual TLS between every service and API keys at the gateway. The one place that reads
their flags, environment variables and files.

    knob                           flag               environment
    TLS directory                  --tls-dir DIR      MOEMESH_TLS_DIR
    API keys, one per line         --api-keys FILE    MOEMESH_API_KEYS_FILE

A TLS directory holds the Kubernetes TLS-secret layout: `ca.crt` (the mesh's certificate authority),
`tls.crt` and `tls.key` (this process's certificate chain and private key, signed by that CA).
`moemesh make-certs --out DIR` writes one. A flag wins over the environment; both empty = off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TLS_FILES = ("ca.crt", "tls.crt", "tls.key")


@dataclass(frozen=True, repr=False)
class TlsFiles:
    """PEM bytes of one process's TLS identity. repr() never shows the key."""

    ca: bytes
    cert: bytes
    key: bytes

    def __repr__(self) -> str:
        return "TlsFiles(<ca>, <cert>, <key>)"


@dataclass(frozen=True)
class SecurityConfig:
    tls_dir: str = ""
    api_keys_file: str = ""

    def __post_init__(self) -> None:
        if self.tls_dir:
            path = Path(self.tls_dir)
            if not path.is_dir():
                raise ValueError(f"tls_dir={self.tls_dir!r} is not a directory")
            missing = [name for name in TLS_FILES if not (path / name).is_file()]
            if missing:
                raise ValueError(f"tls_dir={self.tls_dir!r} lacks {', '.join(missing)} (moemesh make-certs)")
        if self.api_keys_file and not Path(self.api_keys_file).is_file():
            raise ValueError(f"api_keys_file={self.api_keys_file!r} is not a file")

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_dir)

    def tls_files(self) -> TlsFiles | None:
        if not self.tls_dir:
            return None
        path = Path(self.tls_dir)
        ca, cert, key = ((path / name).read_bytes() for name in TLS_FILES)
        return TlsFiles(ca=ca, cert=cert, key=key)

    def api_keys(self) -> tuple[str, ...]:
        """The keys of api_keys_file: one per line; blank lines and `#` comments skipped. Empty = auth off."""
        if not self.api_keys_file:
            return ()
        lines = Path(self.api_keys_file).read_text().splitlines()
        keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
        if not keys:
            raise ValueError(f"api_keys_file={self.api_keys_file!r} holds no key (one per line)")
        for number, key in enumerate(keys, 1):
            if any(ch.isspace() for ch in key) or not key.isprintable():
                raise ValueError(f"api_keys_file={self.api_keys_file!r}: key {number} has whitespace or "
                                 "unprintable characters")  # fmt: skip
        return keys

    @classmethod
    def from_values(
        cls, tls_dir: str | None, api_keys_file: str | None, env: Mapping[str, str] | None = None
    ) -> SecurityConfig:
        """Flags (None = not given) over the environment."""
        env = os.environ if env is None else env
        return cls(
            tls_dir=tls_dir if tls_dir is not None else env.get("MOEMESH_TLS_DIR", ""),
            api_keys_file=api_keys_file
            if api_keys_file is not None
            else env.get("MOEMESH_API_KEYS_FILE", ""),
        )
