"""TLS on Surge's own listener, for when nothing in front of it terminates TLS.

The recommended production set-up terminates TLS at the ingress or load balancer (docs/DEPLOY.md);
this is for a single machine without a proxy, or a policy that wants every hop encrypted.
"""

from __future__ import annotations

import ssl

from server.config import Config, ConfigError


def server_context(config: Config) -> ssl.SSLContext | None:
    """An SSLContext for the listener, or None for plain HTTP. A file that cannot be read, or a
    key that does not match, raises ConfigError naming the variable: start-up stops on one line."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    for name, path in (
        ("TLS_CERT_FILE", config.tls_cert_file),
        ("TLS_KEY_FILE", config.tls_key_file),
    ):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise ConfigError(name, f"cannot read {path}: {exc.strerror}") from None
    # Purpose.CLIENT_AUTH: a server-side context with the system's secure defaults (no
    # compression, server cipher preference); TLS 1.0/1.1 are refused explicitly.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            "TLS_CERT_FILE", f"cannot load the certificate and key: {exc.reason or exc}"
        ) from None
    return context
