"""flowtap's CA and the leaf certificates it signs, checked by openssl and Python's ssl."""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from conftest import flowtap_command
from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.tls_ca import (
    CA_CERT_FILE,
    CA_FILE,
    LEAF_VALIDITY,
    READY_CONTEXTS,
    CertificateAuthority,
    default_ca_dir,
    load_ca_file,
    load_or_create_ca,
)
from flowtap.proxy.tls_native import binding


def run_ca(data_home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_DATA_HOME": str(data_home)}
    return subprocess.run(
        [*flowtap_command(), "ca", *args], env=env, capture_output=True, text=True, timeout=60
    )


def openssl(*args: str, stdin: bytes | None = None) -> str:
    result = subprocess.run(["openssl", *args], input=stdin, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def openssl_fingerprint(path: Path, der: bool = False) -> str:
    form = ["-inform", "DER"] if der else []
    line = openssl("x509", *form, "-in", str(path), "-noout", "-fingerprint", "-sha256")
    return line.strip().split("=", 1)[1]


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return load_or_create_ca(tmp_path / "flowtap")


def test_ca_command_makes_the_ca_once_with_private_modes(tmp_path: Path) -> None:
    first = run_ca(tmp_path)
    assert first.returncode == 0, first.stderr
    directory = tmp_path / "flowtap"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / CA_FILE).stat().st_mode) == 0o600
    cert_file = directory / CA_CERT_FILE
    fingerprint = openssl_fingerprint(cert_file)
    assert f"CA certificate  {cert_file}" in first.stdout
    assert f"SHA-256         {fingerprint}" in first.stdout
    for how in ("update-ca-certificates", "update-ca-trust", "security add-trusted-cert",
                "Firefox", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
                "--cacert", "keytool", "Android"):  # fmt: skip
        assert how in first.stdout
    second = run_ca(tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    # The certificate file others trust holds no key.
    assert b"PRIVATE KEY" not in cert_file.read_bytes()


def test_ca_validity_printed_is_the_certificates(tmp_path: Path) -> None:
    out = run_ca(tmp_path).stdout
    cert_file = tmp_path / "flowtap" / CA_CERT_FILE
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC to " in out
    assert f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC" in out
    assert "CA:TRUE" in openssl("x509", "-in", str(cert_file), "-noout", "-text")


def test_export_writes_pem_and_der_of_the_same_certificate(tmp_path: Path) -> None:
    export = tmp_path / "out" / "ca"
    result = run_ca(tmp_path, "--export", str(export))
    assert result.returncode == 0, result.stderr
    pem, der = export / "flowtap-ca.pem", export / "flowtap-ca.der"
    assert result.stdout.split() == [str(pem), str(der)]
    original = openssl_fingerprint(tmp_path / "flowtap" / CA_CERT_FILE)
    assert openssl_fingerprint(pem) == original
    assert openssl_fingerprint(der, der=True) == original
    assert b"PRIVATE KEY" not in pem.read_bytes()


def test_default_ca_dir_follows_xdg_data_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/data")
    assert default_ca_dir() == Path("/srv/data/flowtap")
    monkeypatch.setenv("XDG_DATA_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", "/home/someone")
    assert default_ca_dir() == Path("/home/someone/.local/share/flowtap")
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_ca_dir() == Path("/home/someone/.local/share/flowtap")


@pytest.mark.parametrize("name", ["example.test", "127.0.0.1", "::1"])
def test_openssl_verifies_a_leaf_against_the_ca(
    ca: CertificateAuthority, tmp_path: Path, name: str
) -> None:
    leaf = ca.leaf(name)
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_bytes(leaf.cert_pem)
    check = ["-verify_ip", name] if ":" in name or name[0].isdigit() else ["-verify_hostname", name]
    out = openssl(
        "verify", "-CAfile", str(ca.cert_file), "-purpose", "sslserver", *check, str(leaf_file)
    )
    assert out.strip() == f"{leaf_file}: OK"
    text = openssl("x509", "-in", str(leaf_file), "-noout", "-ext", "subjectAltName")
    assert (f"IP Address:{name}" if check[0] == "-verify_ip" else f"DNS:{name}") in text.replace(
        "IP Address:0:0:0:0:0:0:0:1", "IP Address:::1"
    )


def test_openssl_rejects_a_leaf_for_another_name(ca: CertificateAuthority, tmp_path: Path) -> None:
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_bytes(ca.leaf("a.example.test").cert_pem)
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.cert_file), "-verify_hostname", "b.example.test",
         str(leaf_file)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0


def test_leaf_is_ecdsa_p256_and_valid_at_most_397_days(ca: CertificateAuthority) -> None:
    leaf = ca.leaf("example.test")
    key = leaf.cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    lifetime = leaf.cert.not_valid_after_utc - leaf.cert.not_valid_before_utc
    assert lifetime <= LEAF_VALIDITY
    now = datetime.datetime.now(datetime.UTC)
    assert leaf.cert.not_valid_before_utc < now < leaf.cert.not_valid_after_utc


def test_leaves_openssl_signs_carry_what_cryptography_signs(ca: CertificateAuthority) -> None:
    # OpenSSL signs the leaves the relay serves after a template cryptography signed: the
    # same subject, issuer, key, extensions and validity, name for name.
    assert ca._signer is not None, "OpenSSL does not sign leaves for this Python"
    longest = ".".join(("a" * 63, "b" * 63, "c" * 63, "d" * 61))  # 253: DER's 2-byte lengths
    for name in ("Mixed.Case.test", "192.0.2.7", "2001:db8::1", "x" * 70 + ".test", longest):
        native, reference = ca.leaf(name).cert, ca._sign_leaf(name).cert
        assert native.subject == reference.subject
        assert native.issuer == reference.issuer
        assert native.public_key() == reference.public_key()
        assert native.signature_algorithm_oid == reference.signature_algorithm_oid
        assert native.version == reference.version
        assert list(native.extensions) == list(reference.extensions)
        assert native.serial_number != reference.serial_number
        assert abs(native.not_valid_before_utc - reference.not_valid_before_utc).total_seconds() < 5
        assert native.not_valid_after_utc - native.not_valid_before_utc == LEAF_VALIDITY


def test_leaves_are_cached_per_name_least_recently_used_out(tmp_path: Path) -> None:
    own = load_or_create_ca(tmp_path / "flowtap")
    small = CertificateAuthority(own.cert, own._key, own.path, own.cert_file, cache_size=3)
    first = small.leaf("a.test")
    small.leaf("b.test")
    small.leaf("c.test")
    # A hit (the same certificate, its serial number and all), and now the most recently used.
    assert small.leaf("a.test").cert_pem == first.cert_pem
    small.leaf("d.test")
    assert small.cached_names() == ["c.test", "a.test", "d.test"]
    assert small.leaf("b.test") is not None and "b.test" in small.cached_names()


def test_leaf_rejects_names_that_are_neither_host_nor_address(ca: CertificateAuthority) -> None:
    for bad in ("", "caf\u00e9.test", "x" * 300):
        with pytest.raises(ValueError):
            ca.leaf(bad)


ServerSide = Callable[[ssl.MemoryBIO, ssl.MemoryBIO], ssl.SSLObject]


def handshake(
    server_side: ssl.SSLContext | ServerSide,
    name: str,
    cafile: Path,
    alpn: str | None = None,
    client_context: ssl.SSLContext | None = None,
    session: ssl.SSLSession | None = None,
) -> ssl.SSLObject:
    """A Python ssl client's handshake for `name` (offering `alpn`; with its own context and
    a session to resume, if given) with a server context or what makes the server's object
    on its BIOs, in memory; the client's side, done."""
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    if isinstance(server_side, ssl.SSLContext):
        server = server_side.wrap_bio(server_in, server_out, server_side=True)
    else:
        server = server_side(server_in, server_out)
    if client_context is None:
        client_context = ssl.create_default_context(cafile=str(cafile))
    if alpn is not None:
        client_context.set_alpn_protocols([alpn])
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(client_in, client_out, server_hostname=name, session=session)
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, obj in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    return client


def test_python_ssl_client_completes_a_handshake_with_the_servers_leaf(
    ca: CertificateAuthority,
) -> None:
    assert ca.cert_file is not None
    client = handshake(ca.server_context("service.test"), "service.test", ca.cert_file)
    peer = client.getpeercert()
    assert peer is not None and ("DNS", "service.test") in peer["subjectAltName"]
    assert ca.server_context("service.test") is ca.server_context("service.test")


def test_each_new_name_presents_its_own_leaf_all_for_the_one_leaf_key(
    ca: CertificateAuthority,
) -> None:
    # More names than contexts made ahead: some take a ready context, some are made at once.
    assert ca.cert_file is not None
    names = [f"name-{index}.test" for index in range(3 * READY_CONTEXTS)]
    keys = set()
    for name in names:
        client = handshake(ca.server_context(name), name, ca.cert_file)
        der = client.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
        keys.add(cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    assert len(keys) == 1
    # The leaf key lives in memory only: the CA's directory holds what it held before.
    assert {path.name for path in ca.cert_file.parent.iterdir()} == {CA_FILE, CA_CERT_FILE}


def test_openssl_s_client_gets_the_leaf_alone_and_verifies_it(ca: CertificateAuthority) -> None:
    # The CA certificate stays out of the chain: the client holds it as its trust anchor.
    assert ca.cert_file is not None
    context = ca.server_context("chain.test")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve_one() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)

        server = threading.Thread(target=serve_one, daemon=True)
        server.start()
        result = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
             "chain.test", "-CAfile", str(ca.cert_file), "-verify_return_error",
             "-verify_hostname", "chain.test", "-showcerts"],
            input=b"", capture_output=True, timeout=30,
        )  # fmt: skip
        server.join(timeout=10)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "Verify return code: 0 (ok)" in out
    assert out.count("-----BEGIN CERTIFICATE-----") == 1
    assert " 0 s:CN = chain.test" in out and " 1 s:" not in out


def test_a_name_prepared_at_the_client_hello_is_signed_ahead_and_served(
    ca: CertificateAuthority,
) -> None:
    assert ca.cert_file is not None
    ca.prepare("ahead.test")
    deadline = time.monotonic() + 10
    while "ahead.test" not in ca.cached_names():
        assert time.monotonic() < deadline, "the CA's thread did not sign the prepared name"
        time.sleep(0.001)
    client = handshake(ca.server_context("ahead.test", "h2"), "ahead.test", ca.cert_file)
    peer = client.getpeercert()
    assert peer is not None and ("DNS", "ahead.test") in peer["subjectAltName"]
    assert ca.server_context("ahead.test", "h2") is ca.server_context("ahead.test", "h2")


def test_many_names_prepared_at_once_each_present_their_own_leaf(
    ca: CertificateAuthority,
) -> None:
    # Asked for in the other order: a handshake takes over a name the thread has not begun.
    assert ca.cert_file is not None
    names = [f"burst-{index}.test" for index in range(20)]
    for name in names:
        ca.prepare(name)
    for name in reversed(names):
        client = handshake(ca.server_context(name), name, ca.cert_file)
        peer = client.getpeercert()
        assert peer is not None and peer["subjectAltName"] == (("DNS", name),)


def test_a_prepared_name_that_is_no_host_name_fails_where_it_is_used(
    ca: CertificateAuthority,
) -> None:
    ca.prepare("caf\u00e9.test")
    with pytest.raises(ValueError):
        ca.server_context("caf\u00e9.test")
    assert ca.server_context("after.test") is not None  # the CA's thread goes on


def leaf_name(client: ssl.SSLObject) -> str:
    """The one DNS name in the leaf the client got."""
    der = client.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    [name] = san.get_values_for_type(x509.DNSName)
    return name


def served(
    ca: CertificateAuthority,
    name: str,
    alpn: str | None = None,
    offer: str | None = None,
    **client: Any,
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A client's handshake (offering `offer`; `client`: its context and session, as
    `handshake` takes them) with the CA's server object for `name` and `alpn`: the client's
    side and the server's."""
    assert ca.cert_file is not None
    made: list[ssl.SSLObject] = []

    def server_side(incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> ssl.SSLObject:
        made.append(ca.server_object(name, alpn, incoming, outgoing))
        return made[0]

    client = handshake(server_side, name, ca.cert_file, alpn=offer, **client)
    return client, made[0]


def test_connections_of_every_name_share_a_keyed_context_and_each_present_its_leaf(
    ca: CertificateAuthority,
) -> None:
    # Through libssl's SSL_use_certificate: one context per ALPN choice holds the leaf key.
    assert binding() is not None, "the libssl binding is not found for this Python"
    contexts = set()
    for index in range(6):
        name, alpn = f"shared-{index}.test", ("h2" if index % 2 else None)
        client, server = served(ca, name, alpn, offer="h2")
        assert leaf_name(client) == name
        assert client.selected_alpn_protocol() == alpn
        contexts.add(server.context)
    assert len(contexts) == 2
    # No name needed a context of its own, so none was made ahead for one.
    assert not ca._background._ready


def test_names_prepared_at_the_client_hello_are_signed_then_and_served(
    ca: CertificateAuthority,
) -> None:
    names = [f"native-{index}.test" for index in range(20)]
    for name in names:
        ca.prepare(name)
    assert ca.cached_names() == names
    for name in reversed(names):
        client, _ = served(ca, name)
        assert leaf_name(client) == name
    assert sorted(ca.cached_names()) == sorted(names)
    ca.prepare("caf\u00e9.test")
    with pytest.raises(ValueError):
        ca.server_object("caf\u00e9.test", None, ssl.MemoryBIO(), ssl.MemoryBIO())


def test_a_tls12_session_resumes_for_the_name_it_began_with_only(
    ca: CertificateAuthority,
) -> None:
    # Every name shares the context that holds the leaf key: a session for one name asked
    # for with another gets a full handshake and that name's leaf (RFC 6066, 3).
    assert ca.cert_file is not None
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    first, _ = served(ca, "first.test", client_context=context)
    again, _ = served(ca, "first.test", client_context=context, session=first.session)
    assert again.session_reused and leaf_name(again) == "first.test"
    other, _ = served(ca, "other.test", client_context=context, session=first.session)
    assert not other.session_reused and leaf_name(other) == "other.test"


def test_without_the_binding_each_name_is_served_from_its_own_context(
    ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ca, "_native", None)
    monkeypatch.setattr(ca, "_signer", None)
    ca.prepare("own.test")
    client, server = served(ca, "own.test", "h2", offer="h2")
    assert leaf_name(client) == "own.test" and client.selected_alpn_protocol() == "h2"
    assert server.context is ca.server_context("own.test", "h2")


def test_the_cas_thread_ends_with_the_ca(tmp_path: Path) -> None:
    ca = load_or_create_ca(tmp_path / "flowtap")
    ca.prepare("gone.test")
    ca.server_context("gone.test")
    thread = ca._background._thread
    assert thread is not None and thread.is_alive()
    del ca
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def make_openssl_ca(tmp_path: Path, key_args: list[str]) -> Path:
    key, cert = tmp_path / "own.key", tmp_path / "own.crt"
    openssl("req", "-x509", "-newkey", *key_args, "-nodes", "-keyout", str(key), "-out",
            str(cert), "-days", "30", "-subj", "/CN=own test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    bundle = tmp_path / "own-ca.pem"
    bundle.write_bytes(cert.read_bytes() + key.read_bytes())
    return bundle


@pytest.mark.parametrize(
    "key_args", [["rsa:2048"], ["ec", "-pkeyopt", "ec_paramgen_curve:P-384"], ["ed25519"]]
)
def test_own_ca_from_a_file_signs_leaves_openssl_verifies(
    tmp_path: Path, key_args: list[str]
) -> None:
    bundle = make_openssl_ca(tmp_path, key_args)
    ca = load_ca_file(bundle)
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_bytes(ca.leaf("own.test").cert_pem)
    out = openssl("verify", "-CAfile", str(tmp_path / "own.crt"), "-verify_hostname",
                  "own.test", str(leaf_file))  # fmt: skip
    assert out.strip().endswith(": OK")
    result = run_ca(tmp_path, "--ca", str(bundle))
    assert result.returncode == 0, result.stderr
    assert openssl_fingerprint(tmp_path / "own.crt") in result.stdout
    # The user's file holds the key: the command never tells anyone to trust that file.
    assert f"--cacert {bundle}" not in result.stdout
    assert not (tmp_path / "flowtap").exists()


def test_bad_ca_files_are_one_line_errors_with_exit_2(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    cert_only = tmp_path / "cert-only.pem"
    bundle = make_openssl_ca(tmp_path, ["rsa:2048"])
    cert_only.write_bytes((tmp_path / "own.crt").read_bytes())
    other_key = tmp_path / "other.pem"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
            str(other_key))  # fmt: skip
    mismatched = tmp_path / "mismatched.pem"
    mismatched.write_bytes((tmp_path / "own.crt").read_bytes() + other_key.read_bytes())
    leaf_as_ca = tmp_path / "leaf-as-ca.pem"
    openssl("req", "-x509", "-key", str(other_key), "-out", str(tmp_path / "leaf.crt"),
            "-days", "1", "-subj", "/CN=leaf", "-addext", "basicConstraints=CA:FALSE")  # fmt: skip
    leaf_as_ca.write_bytes((tmp_path / "leaf.crt").read_bytes() + other_key.read_bytes())
    cases = {
        tmp_path / "missing.pem": "cannot read it",
        tmp_path: "cannot read it",
        garbage: "no PEM certificate",
        cert_only: "no usable PEM private key",
        mismatched: "the private key does not match the certificate",
        leaf_as_ca: "the certificate is not a CA",
    }
    assert bundle.exists()
    for path, problem in cases.items():
        result = run_ca(tmp_path, "--ca", str(path))
        assert result.returncode == 2, (path, result.stderr)
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"flowtap: error: --ca {path}: {problem}")


def test_a_ca_key_others_can_read_is_refused(tmp_path: Path) -> None:
    load_or_create_ca(tmp_path / "flowtap")
    key_file = tmp_path / "flowtap" / CA_FILE
    key_file.chmod(0o644)
    with pytest.raises(FlowtapError, match="readable by others"):
        load_or_create_ca(tmp_path / "flowtap")
    result = run_ca(tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "chmod 600" in result.stderr


def test_a_corrupt_own_ca_file_is_one_line_naming_the_fix(tmp_path: Path) -> None:
    directory = tmp_path / "flowtap"
    load_or_create_ca(directory)
    (directory / CA_FILE).write_bytes(b"truncated")
    result = run_ca(tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"the CA file {directory / CA_FILE}: no PEM certificate" in result.stderr
    assert "flowtap makes a new CA" in result.stderr


def test_an_unwritable_data_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    result = run_ca(blocker)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"flowtap: error: cannot use the CA in {blocker / 'flowtap'}")
