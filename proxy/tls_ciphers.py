"""The cipher suites flowtap prefers on both legs of an intercepted flow: AES-128-GCM first,
as Go's crypto/tls and Chrome order them where the CPU has AES instructions.

Every byte of an intercepted flow is decrypted and encrypted again, so the cipher is most of
flowtap's CPU per megabyte; AES-128-GCM does 10 rounds where AES-256-GCM does 14 (here 3.6
against 3.2 GB/s, `openssl speed -evp`), at a strength TLS counts as ample. Towards the
client flowtap is the server and chooses by its own order (as OpenSSL's
SSL_OP_PRIORITIZE_CHACHA has it, a client that puts ChaCha20 first, one without AES
instructions, gets ChaCha20); towards the upstream it offers the same order, which a
server that honours the client's order (OpenSSL's and nginx's default) takes.
"""

from __future__ import annotations

import ssl

from .tls_native import binding

TLS13_SUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
"""The TLS 1.3 suites in flowtap's order (OpenSSL's own puts AES-256 first, AES-128 last)."""
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    # The rest as Python's ssl has them by default (the same suites, reordered above).
    "@SECLEVEL=2:ECDH+AES:DHE+AES:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM"
)
"""The TLS 1.2 cipher list: the ECDHE AEAD suites AES-128-GCM first."""
# SSL_OP_PRIORITIZE_CHACHA (ssl.h; Python's ssl does not name it).
_OP_PRIORITIZE_CHACHA = 1 << 21


def prefer_aes128(context: ssl.SSLContext) -> bool:
    """Make `context` choose (a server context, by its own order) or offer (a client one)
    flowtap's suites; whether its TLS 1.3 order could be set too (False where the native
    binding cannot be confirmed: TLS 1.3 then keeps OpenSSL's default order)."""
    context.set_ciphers(TLS12_CIPHERS)
    if context.protocol is ssl.PROTOCOL_TLS_SERVER:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | _OP_PRIORITIZE_CHACHA
    native = binding()
    if native is None:
        return False
    try:
        native.set_tls13_suites(context, TLS13_SUITES)
    except ssl.SSLError:
        return False  # a context whose pointer is not where it should be: left as it is
    return True
