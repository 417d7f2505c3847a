"""GOST's TLS options reach the SSL contexts of phts listeners and dialers."""

from __future__ import annotations

import ssl

import pytest

from pht.cli._run import ChainDialer, build_config, prepare
from pht.cli._spec import ConfigError


def test_listener_options_on_the_generated_certificate() -> None:
    config = build_config(["phts://127.0.0.1:0?minVersion=VersionTLS13&alpn=http/1.1"], [])
    (service,) = prepare(config)
    assert isinstance(service.tls, ssl.SSLContext)
    assert service.tls.minimum_version is ssl.TLSVersion.TLSv1_3


def test_listener_without_options_keeps_the_servers_default() -> None:
    (service,) = prepare(build_config(["phts://127.0.0.1:0"], []))
    assert service.tls is True


def test_dialer_options() -> None:
    config = build_config(
        [":0"], ["phts://127.0.0.1:1?maxVersion=1.2&cipherSuites=ECDHE-RSA-AES128-GCM-SHA256"]
    )
    dialer = ChainDialer(config.chains[0])
    (context,) = dialer._contexts.values()
    assert context.maximum_version is ssl.TLSVersion.TLSv1_2
    names = {cipher["name"] for cipher in context.get_ciphers() if cipher["protocol"] != "TLSv1.3"}
    assert names == {"ECDHE-RSA-AES128-GCM-SHA256"}


def test_unknown_cipher_is_a_config_error() -> None:
    config = build_config([":0"], ["phts://127.0.0.1:1?cipherSuites=NOPE"])
    with pytest.raises(ConfigError, match="cipherSuites 'NOPE': no usable cipher"):
        ChainDialer(config.chains[0])
