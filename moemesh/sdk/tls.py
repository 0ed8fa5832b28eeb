"""TLS options of the SDK's connection to a gateway that runs mutual TLS (`moemesh up --tls-dir DIR`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True, repr=False)
class TlsOptions:
    """PEM bytes: the CA that signed the gateway's certificate, and this client's certificate chain and key
    (the gateway asks every caller for one). server_name: the name to verify the gateway's certificate
    against when it differs from the host dialled (e.g. "moemesh")."""

    root_certificates: bytes
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("certificate_chain and private_key must be given together")

    def __repr__(self) -> str:
        return f"TlsOptions(client_certificate={self.certificate_chain is not None}, server_name={self.server_name!r})"

    @classmethod
    def from_dir(cls, path: str | Path, server_name: str | None = None) -> TlsOptions:
        """A directory in the `moemesh make-certs` layout: ca.crt, tls.crt, tls.key (DIR/client for clients)."""
        path = Path(path)
        missing = [n for n in ("ca.crt", "tls.crt", "tls.key") if not (path / n).is_file()]
        if missing:
            raise ValueError(f"tls directory {str(path)!r} lacks {', '.join(missing)}")
        return cls((path / "ca.crt").read_bytes(), (path / "tls.crt").read_bytes(),
                   (path / "tls.key").read_bytes(), server_name)  # fmt: skip

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
