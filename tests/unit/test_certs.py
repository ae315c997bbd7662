"""``fedllm certs``: the development PKI works with what Flower and TLS actually do.

The server certificate is signed by the CA and names the right hosts, a real TLS handshake on
127.0.0.1 succeeds with it (and fails for a name it does not carry), site keys load with
Flower 1.42's own loaders, private files are mode 600, nothing is overwritten without --force,
sites can be added later with the same CA, and a failed write leaves nothing behind.
"""

from __future__ import annotations

import argparse
import ipaddress
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedllm.cli.main import main
from fedllm.deploy import certs
from fedllm.deploy.certs import create_dev_pki
from fedllm.errors import ConfigError

PRIVATE = ("ca.key", "server.key", "sites/alpha", "sites/beta")
PUBLIC = ("ca.crt", "server.pem", "sites/alpha.pub", "sites/beta.pub")


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    create_dev_pki(out, server_names=[], sites=["alpha", "beta"])
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_server_certificate_is_signed_by_the_ca_and_names_the_hosts(pki: Path) -> None:
    ca, server = _cert(pki / "ca.crt"), _cert(pki / "server.pem")
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer does not match
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp384r1"
    assert server.public_key().curve.name == "secp384r1"
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    assert 729 <= days <= 731
    key = serialization.load_pem_private_key((pki / "server.key").read_bytes(), password=None)
    assert key.public_key() == server.public_key()


def test_server_names_become_ip_and_dns_sans(tmp_path: Path) -> None:
    out = tmp_path / "c"
    create_dev_pki(out, server_names=["coord.example.org", "10.0.0.5", "::1"], sites=[], days=30)
    sans = _cert(out / "server.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    with pytest.raises(ConfigError, match="'bad name'.*\n.*'a/b'"):
        create_dev_pki(tmp_path / "d", server_names=["bad name"], sites=["a/b"])


def test_site_keys_load_with_flowers_own_loaders(pki: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for site in ("alpha", "beta"):
        private = serialization.load_ssh_private_key((pki / "sites" / site).read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        registered = try_load_public_key(pki / "sites" / f"{site}.pub")  # `flwr supernode register KEY.pub`
        assert registered == public_key_to_bytes(private.public_key())
        args = argparse.Namespace(auth_supernode_private_key=str(pki / "sites" / site), auth_supernode_public_key=None)
        loaded, public = _try_setup_client_authentication(args)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)  # `flower-supernode --auth-supernode-private-key`
        assert public_key_to_bytes(public) == registered
    alpha = serialization.load_ssh_private_key((pki / "sites" / "alpha").read_bytes(), password=None)
    beta = serialization.load_ssh_public_key((pki / "sites" / "beta.pub").read_bytes())
    assert alpha.public_key() != beta


def test_private_files_are_mode_600_and_public_ones_readable(pki: Path) -> None:
    for name in PRIVATE:
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o600, name
    for name in PUBLIC:
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o644, name
    assert not [p for p in pki.rglob("*") if p.name.endswith(".tmp")]


def test_nothing_is_overwritten_without_force(pki: Path) -> None:
    before = _bytes(pki)
    result = create_dev_pki(pki, server_names=[], sites=["alpha", "beta"])
    assert result.created == [] and len(result.kept) == 8
    assert _bytes(pki) == before
    with pytest.raises(ConfigError, match=r"server\.pem exists for localhost, 127\.0\.0\.1, not for coord\.example\.org"):
        create_dev_pki(pki, server_names=["coord.example.org"], sites=[])
    assert _bytes(pki) == before
    forced = create_dev_pki(pki, server_names=["coord.example.org"], sites=["alpha"], force=True)
    after = _bytes(pki)
    assert {str(p.relative_to(pki)) for p in forced.created} == {"ca.crt", "ca.key", "server.pem", "server.key",
                                                                 "sites/alpha", "sites/alpha.pub"}
    for name in ("ca.crt", "ca.key", "server.pem", "sites/alpha"):
        assert after[name] != before[name], name
    assert after["sites/beta"] == before["sites/beta"]  # not listed: untouched
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600


def test_adding_a_site_later_reuses_the_ca_and_server_certificate(pki: Path) -> None:
    before = _bytes(pki)
    result = create_dev_pki(pki, server_names=[], sites=["gamma"])
    assert [p.name for p in result.created] == ["gamma", "gamma.pub"]
    assert {p.name for p in result.kept} == {"ca.crt", "ca.key", "server.pem", "server.key"}
    after = _bytes(pki)
    assert {k: after[k] for k in before} == before
    serialization.load_ssh_private_key(after["sites/gamma"], password=None)
    # the same server names, given explicitly, also keep the certificate
    assert create_dev_pki(pki, server_names=["127.0.0.1", "localhost"], sites=[]).created == []


def test_half_pairs_and_foreign_files_are_refused(pki: Path) -> None:
    (pki / "sites" / "beta.pub").unlink()
    with pytest.raises(ConfigError, match=r"sites/beta exists but .*sites/beta\.pub does not"):
        create_dev_pki(pki, server_names=[], sites=["beta"])
    (pki / "sites" / "alpha.pub").write_bytes((pki / "sites" / "beta").read_bytes())
    with pytest.raises(ConfigError, match=r"sites/alpha.*not an OpenSSH key pair"):
        create_dev_pki(pki, server_names=[], sites=["alpha"])
    other = pki.parent / "other"
    create_dev_pki(other, server_names=[], sites=[])
    shutil.copy(other / "server.pem", pki / "server.pem")  # signed by another CA
    with pytest.raises(ConfigError, match=r"server\.pem is not a certificate signed by the CA"):
        create_dev_pki(pki, server_names=[], sites=[])
    (pki / "ca.key").unlink()
    with pytest.raises(ConfigError, match=r"ca\.crt exists but .*ca\.key does not"):
        create_dev_pki(pki, server_names=[], sites=[])


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = certs.write_bytes_atomic, []

    def fail_on_fourth(path, data):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(certs, "write_bytes_atomic", fail_on_fourth)
    out = tmp_path / "certs"
    with pytest.raises(OSError, match="No space"):
        create_dev_pki(out, server_names=[], sites=["alpha"])
    assert len(calls) == 4
    assert [p for p in out.rglob("*") if p.is_file()] == []


def _handshake(pki: Path, server_hostname: str) -> str:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]
        errors: list[BaseException] = []

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError) as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                return tls.recv(2).decode()
        finally:
            thread.join(timeout=10)


def test_real_tls_handshake_with_the_ca_on_localhost(pki: Path) -> None:
    assert _handshake(pki, "localhost") == "ok"
    assert _handshake(pki, "127.0.0.1") == "ok"
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        _handshake(pki, "coord.example.org")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")
def test_the_documented_ssh_keygen_command_makes_a_key_flower_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    key = tmp_path / "KEY"
    command = shlex.split(certs.SITE_KEY_COMMAND.replace("KEY", shlex.quote(str(key))))
    subprocess.run([*command, "-q"], check=True)
    private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    try_load_public_key(Path(f"{key}.pub"))
    pem = tmp_path / "PEMKEY"  # the `-m PEM` variant is NOT loadable by flower-supernode
    subprocess.run(["ssh-keygen", "-t", "ecdsa", "-b", "384", "-m", "PEM", "-N", "", "-q", "-f", str(pem)], check=True)
    with pytest.raises(ValueError):
        serialization.load_ssh_private_key(pem.read_bytes(), password=None)


def test_command_prints_where_each_file_goes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--sites", "alpha, beta,", "--server-name", "localhost"]) == 0
    text = capsys.readouterr().out
    for name in PRIVATE + PUBLIC:
        assert f"created {out / name}" in text
    assert f"flwr supernode register {out}/sites/alpha.pub" in text
    assert "site 'beta' only" in text and "development CA" in text and certs.SITE_KEY_COMMAND in text
    assert main(["certs", "--out", str(out), "--sites", "gamma"]) == 0
    text = capsys.readouterr().out
    assert f"kept    {out / 'ca.crt'}" in text and f"created {out / 'sites' / 'gamma'}" in text
