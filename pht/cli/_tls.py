"""TLS contexts of ``phts`` listeners and dialers, with GOST's rules and options."""

from __future__ import annotations

import os
import ssl

from ._spec import ClientTLS, ConfigError, DefaultTLS, ServerTLS, TLSOptions

__all__ = ["apply_tls_options", "client_context", "server_context"]


def _require_file(path: str, what: str, where: str) -> None:
    if not os.path.isfile(path):
        reason = "not found" if not os.path.exists(path) else "not a file"
        raise ConfigError(f"{where}: {what} {path!r}: {reason}")


def _ssl_reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


_SSL_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def apply_tls_options(context: ssl.SSLContext, options: TLSOptions, where: str) -> None:
    """GOST's ``minVersion``/``maxVersion``/``cipherSuites``/``alpn`` on ``context``.

    Cipher suites use OpenSSL's names and bound TLS 1.2 and below (Python's
    ssl module cannot choose TLS 1.3 suites).
    """
    try:
        if options.min_version:
            context.minimum_version = _SSL_VERSIONS[options.min_version]
        if options.max_version:
            context.maximum_version = _SSL_VERSIONS[options.max_version]
    except (ValueError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}: TLS version not available: {_ssl_reason(exc)}") from None
    if options.cipher_suites:
        try:
            context.set_ciphers(":".join(options.cipher_suites))
        except ssl.SSLError:
            raise ConfigError(
                f"{where}: cipherSuites {','.join(options.cipher_suites)!r}: no usable cipher "
                "(use OpenSSL names such as ECDHE-RSA-AES128-GCM-SHA256)"
            ) from None
    if options.alpn:
        context.set_alpn_protocols(list(options.alpn))


def server_context(tls: ServerTLS | DefaultTLS, where: str) -> ssl.SSLContext:
    """A server context from certificate files; ``ca_file`` asks clients for certificates."""
    assert tls.cert_file is not None
    _require_file(tls.cert_file, "certificate file", where)
    if tls.key_file:
        _require_file(tls.key_file, "key file", where)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{where}: cannot load certificate {tls.cert_file!r}: {_ssl_reason(exc)}"
        ) from None
    if tls.ca_file:
        _require_file(tls.ca_file, "CA file", where)
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{where}: cannot load CA file {tls.ca_file!r}: {_ssl_reason(exc)}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: ClientTLS, where: str) -> ssl.SSLContext:
    """A client context, with GOST's rules.

    ``secure=false`` (the default) checks nothing, unless a ``caFile`` is
    given: then the chain must lead to that CA, but the name is not checked.
    ``secure=true`` checks chain and name (against ``caFile`` or the system's CAs).
    """
    if tls.ca_file:
        _require_file(tls.ca_file, "CA file", where)
    try:
        if tls.verify:
            context = ssl.create_default_context(cafile=tls.ca_file)
            context.check_hostname = tls.secure
        else:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if tls.cert_file:
            _require_file(tls.cert_file, "certificate file", where)
            context.load_cert_chain(tls.cert_file, tls.key_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{where}: cannot set up TLS: {_ssl_reason(exc)}") from None
    apply_tls_options(context, tls.options, where)
    return context
