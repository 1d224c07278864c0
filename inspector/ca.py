"""`flowtap ca`: where the CA is, its fingerprint and validity, how to trust it; --export."""

from __future__ import annotations

import os
from pathlib import Path

from flowtap.proxy.errors import FlowtapError
from flowtap.proxy.tls_ca import CertificateAuthority, load_ca_file, load_or_create_ca

EXPORT_PEM = "flowtap-ca.pem"
EXPORT_DER = "flowtap-ca.der"


def open_ca(ca_file: str | None) -> CertificateAuthority:
    """The user's CA from `--ca FILE`, else flowtap's own (made on first use)."""
    return load_ca_file(Path(ca_file)) if ca_file else load_or_create_ca()


def describe_ca(ca: CertificateAuthority) -> str:
    """The text `flowtap ca` prints: the certificate's facts and how to trust it."""
    cert = ca.cert
    if ca.cert_file is not None:
        path = str(ca.cert_file)
        where = f"CA certificate  {path}"
    else:
        # The user's own CA file holds its key too: never tell anyone to copy that around.
        path = f"DIR/{EXPORT_PEM}"
        where = f"CA file         {ca.path} (with its key: trust {path} from --export DIR)"
    return f"""\
{where}
subject         {cert.subject.rfc4514_string()}
SHA-256         {ca.fingerprint_sha256()}
valid           {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC to \
{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC

Trust it where the client runs (only on machines you control: whoever holds its key can
impersonate any site to them); `flowtap ca --export DIR` writes it as PEM and DER.
  Debian/Ubuntu  sudo cp {path} /usr/local/share/ca-certificates/flowtap-ca.crt
                 sudo update-ca-certificates
  Fedora/RHEL    sudo cp {path} /etc/pki/ca-trust/source/anchors/flowtap-ca.pem
                 sudo update-ca-trust
  macOS          sudo security add-trusted-cert -d -r trustRoot \\
                   -k /Library/Keychains/System.keychain {path}
  Firefox        Settings > Privacy & Security > Certificates > View Certificates >
                   Authorities > Import... (or set security.enterprise_roots.enabled)
  Python         SSL_CERT_FILE={path} (ssl, httpx)
                 REQUESTS_CA_BUNDLE={path} (requests)
  Node.js        NODE_EXTRA_CA_CERTS={path}
  curl           curl --cacert {path} https://...
  Java           keytool -importcert -noprompt -alias flowtap -file {path} \\
                   -cacerts -storepass changeit
  Android        flowtap ca --export DIR, copy DIR/{EXPORT_DER} to the device, Settings >
                   Security > Encryption & credentials > Install a certificate > CA certificate
                   (apps trust user CAs only if their network security config allows it)
"""


def export_ca(ca: CertificateAuthority, directory: Path) -> list[Path]:
    """Write the CA certificate (never its key) to `directory` as PEM and DER; the paths."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in ((EXPORT_PEM, ca.cert_pem), (EXPORT_DER, ca.cert_der)):
            path = directory / name
            path.write_bytes(data)
            os.chmod(path, 0o644)
            written.append(path)
    except OSError as exc:
        raise FlowtapError(
            f"--export {directory}: cannot write there ({exc.strerror or exc}); "
            "give a directory you can write to"
        ) from None
    return written


def ca_command(ca_file: str | None, export_dir: str | None) -> int:
    """Print the CA's facts and how to trust it, or export it; the exit status."""
    ca = open_ca(ca_file)
    if export_dir is not None:
        for path in export_ca(ca, Path(export_dir)):
            print(path)
        return 0
    print(describe_ca(ca), end="")
    return 0
