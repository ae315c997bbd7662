"""``fedllm certs``: a development PKI for trials: a CA, the coordinator's TLS certificate, site keys.

Files written under ``OUT`` (default ``certs/``):

* ``ca.crt``, ``ca.key``: a self-signed CA (EC P-384, SHA-384), which signs only the server
  certificate (path length 0). ``ca.crt`` goes to every site (``connection.root-certificates``)
  and to the coordinator's tools; ``ca.key`` (mode 600) stays with whoever issues certificates.
* ``server.pem``, ``server.key``: the coordinator's SuperLink TLS certificate (EC P-384, signed by
  the CA, extended key usage serverAuth), with every ``--server-name`` as a subject alternative
  name (IP addresses as IP SANs, others as DNS names). ``server.key`` has mode 600.
* ``sites/<name>``, ``sites/<name>.pub``: a site's SuperNode authentication key pair, EC P-384 in
  OpenSSH format: the private key as Flower 1.42 loads it (``flower-supernode
  --auth-supernode-private-key``, ``load_ssh_private_key`` without a passphrase; mode 600) and
  the public key as ``flwr supernode register KEY.pub`` reads it. These keys are not certificates:
  the CA has nothing to do with them.

Existing files are kept, not overwritten: a second run with ``--sites d`` reuses the CA and the
server certificate and adds only the missing site keys (``--server-name`` must then match the
kept certificate). ``--force`` makes the CA, the server certificate and the listed sites' keys
anew. Each file is written atomically (:mod:`fedllm.files`); when a write fails, the files this
call created are removed again.

This is a CA for trials only. Institutions use their own PKI: the coordinator's certificate from
their CA, and SuperNode keys made at each site (``ssh-keygen -t ecdsa -b 384 -N "" -f KEY``) so
that the private key never leaves it. Written on ``cryptography`` (docs/architecture.md: prefer a
well-kept library).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from fedllm.config import SITE_NAME_RE
from fedllm.errors import ConfigError
from fedllm.files import write_bytes_atomic

if TYPE_CHECKING:  # cryptography is imported where it is used: `fedllm --help` builds this parser
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 730
CA_NAME = "fedllm development CA"
SITE_KEY_COMMAND = 'ssh-keygen -t ecdsa -b 384 -N "" -f KEY'
_DNS_RE = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")
_CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class PkiResult:
    """What :func:`create_dev_pki` did: ``created`` and ``kept`` file paths, the server
    certificate's names, the sites asked for, and when the CA expires."""

    out: Path
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    server_names: list[str] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    ca_expires: datetime | None = None

    @property
    def ca_certificate(self) -> Path:
        return self.out / "ca.crt"

    @property
    def server_certificate(self) -> Path:
        return self.out / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.out / "server.key"

    def site_key(self, site: str) -> Path:
        return self.out / "sites" / site

    def site_public_key(self, site: str) -> Path:
        return self.out / "sites" / f"{site}.pub"


def _san(name: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name.lower())


def _san_text(general: x509.GeneralName) -> str:
    from cryptography import x509

    return str(general.value) if isinstance(general, x509.IPAddress) else str(general.value).lower()


def _check_inputs(server_names: list[str], sites: list[str], days: int) -> None:
    problems = []
    for name in server_names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if not name.isascii() or not _DNS_RE.fullmatch(name):
                problems.append(f"--server-name {name!r}: not an IP address or a DNS name (letters, digits, '-', "
                                "'.'; IPv6 without brackets; internationalised names in their xn-- form)")
    for site in sites:
        if not SITE_NAME_RE.fullmatch(site):
            problems.append(f"--sites: {site!r} is not a site name: 1 to 64 letters, digits, '.', '_' and '-', "
                            "not starting with '.' (the site's site-name)")
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        problems.append(f"--days {days!r}: must be a whole number of days >= 1")
    if problems:
        raise ConfigError("fedllm certs:\n  - " + "\n  - ".join(problems))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_ca(days: int, now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedllm (for trials only)")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW).not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def _make_server(names: list[str], ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, days: int,
                 now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    common_name = names[0][:64]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def _site_key_pair(site: str) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" fedllm-site-{site}\n".encode("ascii")


def _load_ca(cert_path: Path, key_path: Path, now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    redo = "use --force to make a new CA (then every site needs the new ca.crt)"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{cert_path} / {key_path}: cannot be read as the CA's certificate and key ({exc}); "
                          f"{redo}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
        raise ConfigError(f"{key_path} is not the private key of {cert_path}; {redo}")
    if now > cert.not_valid_after_utc:
        raise ConfigError(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; {redo}")
    return cert, key


def _kept_server_names(cert_path: Path, ca_cert: x509.Certificate, wanted: list[str]) -> list[str]:
    """The names of the existing server certificate, after checking it was signed by ``ca_cert``
    and that ``wanted`` (when given) names the same hosts."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    redo = "use --force to make a new CA and server certificate"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(f"{cert_path} is not a certificate signed by the CA in ca.crt ({exc or 'bad signature'}); "
                          f"{redo}") from None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    names = [_san_text(general) for general in sans]
    if wanted and sorted(names) != sorted(_san_text(_san(n)) for n in wanted):
        raise ConfigError(f"{cert_path} exists for {', '.join(names) or 'no names'}, not for {', '.join(wanted)}; "
                          "drop --server-name to keep it, or use --force to make the CA and server certificate anew")
    return names


def _check_site_pair(private_path: Path, public_path: Path) -> None:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(public_path.read_bytes())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{private_path} / {public_path}: not an OpenSSH key pair ({exc}); remove both or use "
                          "--force (the site must then be registered again)") from None
    if key.public_key() != public:
        raise ConfigError(f"{public_path} is not the public key of {private_path}; remove both or use --force "
                          "(the site must then be registered again)")


def _pair_state(first: Path, second: Path) -> bool:
    """True: both exist; False: neither; ConfigError: only one (a half pair is never completed)."""
    exists = first.exists(), second.exists()
    if exists[0] != exists[1]:
        present, missing = (first, second) if exists[0] else (second, first)
        raise ConfigError(f"{present} exists but {missing} does not; restore {missing.name}, or use --force to "
                          "make the pair anew")
    return exists[0]


def create_dev_pki(out: Path, *, server_names: list[str], sites: list[str], days: int = DEFAULT_DAYS,
                   force: bool = False) -> PkiResult:
    """Create (or complete) the development PKI in ``out``; see the module docstring.

    ``server_names``: the server certificate's names; empty: ("localhost", "127.0.0.1") for a new
    certificate and whatever an existing one has. Raises ``ConfigError`` for bad names, a half
    pair of files, or an existing file that does not fit, naming the file.
    """
    from cryptography.hazmat.primitives import serialization

    out = Path(out)
    sites = list(dict.fromkeys(s.strip() for s in sites if s.strip()))
    server_names = list(dict.fromkeys(server_names))
    _check_inputs(server_names, sites, days)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder")
    now = datetime.now(UTC)
    ca_crt, ca_key_path, server_pem, server_key_path = out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key"
    writes: list[tuple[Path, bytes, bool]] = []  # (path, content, private)
    kept: list[Path] = []

    if not force and _pair_state(ca_crt, ca_key_path):
        ca_cert, ca_key = _load_ca(ca_crt, ca_key_path, now)
        kept += [ca_crt, ca_key_path]
    else:
        ca_cert, ca_key = _make_ca(days, now)
        writes += [(ca_key_path, _key_pem(ca_key), True),
                   (ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), False)]
    if not force and _pair_state(server_pem, server_key_path):
        if not kept:
            raise ConfigError(f"{server_pem} exists but there is no CA (ca.crt, ca.key) that signed it; restore them "
                              "or use --force to make both anew")
        names = _kept_server_names(server_pem, ca_cert, server_names)
        kept += [server_pem, server_key_path]
    else:
        names = server_names or list(DEFAULT_SERVER_NAMES)
        server_cert, server_key = _make_server(names, ca_cert, ca_key, days, now)
        writes += [(server_key_path, _key_pem(server_key), True),
                   (server_pem, server_cert.public_bytes(serialization.Encoding.PEM), False)]
    for site in sites:
        private_path, public_path = out / "sites" / site, out / "sites" / f"{site}.pub"
        if not force and _pair_state(private_path, public_path):
            _check_site_pair(private_path, public_path)
            kept += [private_path, public_path]
        else:
            private, public = _site_key_pair(site)
            writes += [(private_path, private, True), (public_path, public, False)]

    created: list[Path] = []
    new_files: list[Path] = []
    try:
        for path, content, owner_only in writes:
            existed = path.exists()
            write_bytes_atomic(path, content)  # a temporary file of mode 600, renamed into place
            if not existed:
                new_files.append(path)
            os.chmod(path, 0o600 if owner_only else 0o644)
            created.append(path)
    except BaseException:
        for path in new_files:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return PkiResult(out=out, created=created, kept=kept, server_names=names, sites=sites,
                     ca_expires=ca_cert.not_valid_after_utc)


def add_certs_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``fedllm certs``; sets ``func`` to :func:`cmd_certs`."""
    parser.add_argument("--out", default="certs", metavar="DIR", help="folder for the files (default certs)")
    parser.add_argument("--server-name", action="append", metavar="NAME",
                        help="a host name or IP address the sites use to reach the coordinator (repeatable; default "
                             "localhost and 127.0.0.1)")
    parser.add_argument("--sites", default="", metavar="A,B,C",
                        help="site names (their site-name): one SuperNode key pair each")
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity in days (default {DEFAULT_DAYS})")
    parser.add_argument("--force", action="store_true",
                        help="make the CA, the server certificate and the listed sites' keys anew, overwriting them")


def cmd_certs(args: argparse.Namespace) -> int:
    """``fedllm certs``: create the files, then say which goes where."""
    sites = [s for s in (args.sites or "").split(",") if s.strip()]
    result = create_dev_pki(Path(args.out), server_names=args.server_name or [], sites=sites, days=args.days,
                            force=args.force)
    for line in pki_summary_lines(result):
        print(line, flush=True)
    return 0


def pki_summary_lines(result: PkiResult) -> list[str]:
    """What was created and kept, and where each file goes."""
    out = result.out
    lines = [(f"Development PKI in {out}/ (CA valid until {result.ca_expires:%Y-%m-%d}; server certificate for "
              f"{', '.join(result.server_names)})")]
    lines += [f"  created {p}" for p in result.created] + [f"  kept    {p}" for p in result.kept]
    rows = [
        (out / "ca.crt", "every site (connection.root-certificates) and the coordinator's fedllm run; public"),
        (out / "ca.key", "whoever issues certificates (it signs the server certificate); never share it"),
        (out / "server.pem", "the coordinator's SuperLink only: its TLS certificate"),
        (out / "server.key", "the coordinator's SuperLink only: its private key, never leaves it"),
    ]
    for site in result.sites:
        public = result.site_public_key(site)
        rows += [(result.site_key(site), f"site '{site}' only (connection.auth-key); never shared or copied elsewhere"),
                 (public, f"the coordinator, to register the site: flwr supernode register {public}")]
    width = max(len(str(path)) for path, _ in rows)
    lines.append("Where each file goes:")
    lines += [f"  {str(path).ljust(width)}  {text}" for path, text in rows]
    lines.append(
        "This is a development CA, for trials. Institutions use their own PKI: the coordinator's certificate from "
        "their CA (sites set root-certificates to that CA's certificate), and each site makes its own SuperNode key "
        f"with `{SITE_KEY_COMMAND}` so that the private key never leaves the site; only KEY.pub goes to the "
        "coordinator.")
    return lines
