"""`moemesh make-certs --out DIR`: a certificate authority and the certificates a mesh with mutual TLS needs.

    DIR/ca.crt  DIR/ca.key           the mesh's CA (keep ca.key offline; it signs new certificates)
    DIR/tls.crt DIR/tls.key          the services' certificate (CN moemesh-mesh): `--tls-dir DIR`
    DIR/client/{ca.crt,tls.crt,tls.key}  a client certificate (CN moemesh-client): `Client(..., tls_dir=DIR/client)`

The services' certificate names `moemesh` (what mesh channels verify), `localhost`, 127.0.0.1 and ::1, plus
every `--host` given (the names and addresses clients dial the gateway by). Keys are ECDSA P-256, files 0600.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from moemesh.transport.security import CLIENT_NAME, MESH_PEER_NAME, MESH_TLS_NAME


def write_mesh_certs(out: Path, hosts: tuple[str, ...] = (), days: int = 365) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, key, issuer_key, issuer: x509.Name, extensions: list) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(until)
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def pem_cert(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("moemesh-ca")
    ca = issue("moemesh-ca", ca_key, ca_key, ca_name, [(x509.BasicConstraints(ca=True, path_length=0), True)])

    sans: list[x509.GeneralName] = [x509.DNSName(MESH_TLS_NAME), x509.DNSName("localhost")]
    for host in ("127.0.0.1", "::1", *hosts):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    leaf = [(x509.BasicConstraints(ca=False, path_length=None), True)]
    mesh_key = ec.generate_private_key(ec.SECP256R1())
    both = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    mesh = issue(MESH_PEER_NAME, mesh_key, ca_key, ca_name,
                 [*leaf, (x509.SubjectAlternativeName(sans), False), (both, False)])  # fmt: skip
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_only = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    client = issue(CLIENT_NAME, client_key, ca_key, ca_name, [*leaf, (client_only, False)])

    files = {
        "ca.crt": pem_cert(ca), "ca.key": pem_key(ca_key), "tls.crt": pem_cert(mesh), "tls.key": pem_key(mesh_key),
        "client/ca.crt": pem_cert(ca), "client/tls.crt": pem_cert(client), "client/tls.key": pem_key(client_key),
    }  # fmt: skip
    (out / "client").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = out / rel
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if rel.endswith(".key") else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-certs",
        help="write a CA and mesh + client certificates for mutual TLS (--tls-dir)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if missing)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="a DNS name or IP clients dial the gateway by (repeatable)")  # fmt: skip
    p.add_argument("--days", type=int, default=365, help="validity")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    if args.days < 1:
        print(f"error: --days={args.days} must be >= 1", file=sys.stderr)
        return 2
    try:
        import cryptography  # noqa: F401
    except ImportError:
        print(
            "error: make-certs needs the 'cryptography' package (pip install 'moemesh[server]')",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out={args.out!r} exists and is not a directory", file=sys.stderr)
        return 2
    write_mesh_certs(out, tuple(args.host), args.days)
    print(f"wrote {out}/ca.crt, tls.crt, tls.key (services: --tls-dir {out}) and {out}/client/ (clients)")
    return 0
