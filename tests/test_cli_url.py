"""The -L / -F URL parser follows GOST's rules (config/cmd in go-gost/x)."""

from __future__ import annotations

import logging
import re

import pytest

from pht.cli._spec import (
    DEFAULT_PUSH_WINDOW,
    Address,
    ClientTLS,
    ConfigError,
    Credentials,
    PHTPaths,
    ServerTLS,
)
from pht.cli._url import parse_node, parse_service

CUSTOM_PATHS = PHTPaths(authorize_path="/authorize", push_path="/push", pull_path="/pull")


# --- every -L of GOST's PHT documentation --------------------------------------------


@pytest.mark.parametrize("listener", ["pht", "phts"])
def test_http_over_pht_with_paths(listener: str) -> None:
    spec = parse_service(
        f"http+{listener}://:8443?authorizePath=/authorize&pushPath=/push&pullPath=/pull"
    )
    assert spec.handler == "http"
    assert spec.listener == listener
    assert spec.listen == Address("", 8443)
    assert spec.paths == CUSTOM_PATHS
    assert spec.targets == ()
    assert spec.auth is None


def test_custom_paths_are_kept() -> None:
    spec = parse_service("http+pht://:8443?authorizePath=/a&pushPath=/tx&pullPath=/rx")
    assert spec.paths == PHTPaths(authorize_path="/a", push_path="/tx", pull_path="/rx")


@pytest.mark.parametrize(
    ("url", "handler", "listener"),
    [
        ("http+pht://:8443", "http", "pht"),
        ("socks5+pht://:8443", "socks5", "pht"),
        ("relay+pht://:8443", "relay", "pht"),
        ("http+phts://:8443", "http", "phts"),
        ("socks5+phts://:8443", "socks5", "phts"),
        ("relay+phts://:8443", "relay", "phts"),
        ("socks+pht://:8443", "socks5", "pht"),
        ("pht://:8443", "auto", "pht"),
        ("phts://:8443", "auto", "phts"),
        ("socks5://:1080", "socks5", "tcp"),
        ("http://:8080", "http", "tcp"),
        ("relay://:8421", "relay", "tcp"),
        ("auto://:1080", "auto", "tcp"),
    ],
)
def test_scheme_names_handler_and_listener(url: str, handler: str, listener: str) -> None:
    spec = parse_service(url)
    assert (spec.handler, spec.listener) == (handler, listener)
    assert spec.paths == PHTPaths()
    assert spec.scheme == f"{handler}+{listener}"


def test_port_forwarding_over_pht_is_forward_handler() -> None:
    # gost -L pht://:8443/:1080 -L socks5://:1080
    spec = parse_service("pht://:8443/:1080")
    assert spec.handler == "forward"
    assert spec.listener == "pht"
    assert spec.targets == (Address("localhost", 1080),)
    assert parse_service("socks5://:1080").handler == "socks5"


def test_explicit_forward_plus_pht() -> None:
    spec = parse_service("forward+pht://:8443/:1080")
    assert (spec.handler, spec.listener) == ("forward", "pht")
    assert spec.targets == (Address("localhost", 1080),)


def test_tcp_port_forwarding() -> None:
    # Parsed only: nothing ever connects to this address.
    spec = parse_service("tcp://:2222/10.0.0.5:22")
    assert (spec.handler, spec.listener) == ("tcp", "tcp")
    assert spec.targets == (Address("10.0.0.5", 22),)


def test_relay_keeps_its_handler_with_a_target() -> None:
    spec = parse_service("relay+pht://:8443/:1080")
    assert spec.handler == "relay"
    assert spec.targets == (Address("localhost", 1080),)


def test_several_targets() -> None:
    spec = parse_service("tcp://:8080/192.0.2.1:80,192.0.2.2:80,[2001:db8::1]:8080")
    assert spec.targets == (
        Address("192.0.2.1", 80),
        Address("192.0.2.2", 80),
        Address("2001:db8::1", 8080),
    )
    assert str(spec.targets[2]) == "[2001:db8::1]:8080"


@pytest.mark.parametrize("url", [":1080", "127.0.0.1:1080", "localhost:1080"])
def test_no_scheme_is_auto_on_tcp(url: str) -> None:
    spec = parse_service(url)
    assert (spec.handler, spec.listener) == ("auto", "tcp")
    assert spec.listen.port == 1080


def test_listen_host() -> None:
    assert parse_service("socks5+pht://127.0.0.1:8443").listen == Address("127.0.0.1", 8443)
    assert parse_service("socks5+pht://[::1]:8443").listen == Address("::1", 8443)
    assert parse_service("socks5+pht://:0").listen == Address("", 0)


def test_unknown_names_fall_back_like_gost() -> None:
    spec = parse_service("whatever+nonsense://:8443")
    assert (spec.handler, spec.listener) == ("auto", "tcp")
    node = parse_node("whatever+nonsense://server:8443").nodes[0]
    assert (node.connector, node.dialer) == ("http", "tcp")


def test_credentials() -> None:
    spec = parse_service("socks5+pht://user:p%40ss:word@:8443")
    assert spec.auth == Credentials("user", "p@ss:word")
    assert "p@ss" not in repr(spec.auth)


def test_auth_option_is_base64() -> None:
    # GOST's auth=base64(user:pass) form
    spec = parse_service("http://:8080?auth=dXNlcjpwYXNz")
    assert spec.auth == Credentials("user", "pass")


def test_service_options() -> None:
    spec = parse_service(
        "http+phts://:8443?backlog=16&certFile=/c.pem&keyFile=/k.pem&caFile=/ca.pem&x=1"
    )
    assert spec.backlog == 16
    assert spec.tls == ServerTLS(cert_file="/c.pem", key_file="/k.pem", ca_file="/ca.pem")


def test_tls_aliases_and_case() -> None:
    spec = parse_service("http+phts://:8443?cert=/c.pem&KEY=/k.pem")
    assert spec.tls == ServerTLS(cert_file="/c.pem", key_file="/k.pem")
    spec = parse_service("http+phts://:8443?tls.certFile=/c.pem")
    assert spec.tls == ServerTLS(cert_file="/c.pem")


def test_prefixed_option_wins() -> None:
    spec = parse_service("http+pht://:8443?listener.pushPath=/a&pushPath=/b")
    assert spec.paths.push_path == "/a"
    spec = parse_service("http+pht://:8443?pushPath=/b&listener.pushPath=/a")
    assert spec.paths.push_path == "/a"


def test_path_without_slash_falls_back_to_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pht.cli"):
        spec = parse_service("http+pht://:8443?pushPath=push&pullPath=&authorizePath=/auth")
    assert spec.paths == PHTPaths(authorize_path="/auth", push_path="/push", pull_path="/pull")
    assert "does not start with '/'" in caplog.text


def test_unknown_option_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pht.cli"):
        parse_service("http+pht://:8443?keepAlive=true")
    assert "unknown option 'keepAlive': ignored" in caplog.text


def test_option_of_another_part_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pht.cli"):
        parse_service("http+pht://:8443?host=cdn.example")
    assert "option 'host' is a dialer option: it has no effect here" in caplog.text


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("socks5+pht://:8443?udp=true", "udp"),
        ("http+pht://:8443?probeResistance=code:404", "probeResistance"),
        ("pht://:8443?mptcp=true", "mptcp"),
        ("relay+pht://:8443?handler.readTimeout=5s", "handler.readTimeout"),
    ],
)
def test_gost_option_pht_lacks_is_refused_by_name(text: str, name: str) -> None:
    with pytest.raises(ConfigError, match=f"option '{re.escape(name)}' .* not supported"):
        parse_service(text)


def test_header_dot_name_is_a_request_header() -> None:
    hop = parse_node("socks5+pht://server:8443?header.ServiceToken=t0k&header=X-A:1")
    (node,) = hop.nodes
    assert set(node.headers) == {("ServiceToken", "t0k"), ("X-A", "1")}


def test_header_dot_name_with_a_prefix_keeps_its_spelling() -> None:
    (node,) = parse_node("pht://server:8443?dialer.header.CF-Access-Client-Id=abc").nodes
    assert node.headers == (("CF-Access-Client-Id", "abc"),)


def test_header_dot_name_rejects_a_bad_name() -> None:
    with pytest.raises(ConfigError, match="not a valid header name"):
        parse_node("pht://server:8443?header.Bad%20Name=1")


def test_nodelay_on_relay_handler_and_connector() -> None:
    assert parse_service("relay+pht://:8443?nodelay=true").nodelay
    assert not parse_service("relay+pht://:8443").nodelay
    (node,) = parse_node("relay+pht://server:8443?nodelay=true").nodes
    assert node.nodelay


def test_connect_timeout_and_proxy_on_a_node() -> None:
    (node,) = parse_node(
        "socks5+pht://server:8443?connectTimeout=2.5s&proxy=http://u:p@squid:3128"
    ).nodes
    assert node.connect_timeout == 2.5
    assert node.proxy == "http://u:p@squid:3128"


def test_proxy_needs_the_plain_pht_dialer() -> None:
    with pytest.raises(ConfigError, match="proxy= works with the pht dialer only"):
        parse_node("socks5+phts://server:8443?proxy=http://squid:3128")


def test_resume_on_a_pht_node() -> None:
    (node,) = parse_node("forward+pht://server:8443?resume=true").nodes
    assert node.resume
    (node,) = parse_node("forward+phts://server:8443").nodes
    assert not node.resume
    with pytest.raises(ConfigError, match="resume works with the pht and phts dialers only"):
        parse_node("socks5://server:1080?resume=true")


def test_push_window_on_a_pht_node() -> None:
    (node,) = parse_node("forward+pht://server:8443?pushWindow=2").nodes
    assert node.push_window == 2
    (node,) = parse_node("forward+phts://server:8443").nodes
    assert node.push_window == DEFAULT_PUSH_WINDOW == 4
    with pytest.raises(ConfigError, match="pushWindow"):
        parse_node("forward+pht://server:8443?pushWindow=0")
    with pytest.raises(ConfigError, match="pushWindow works with the pht and phts dialers only"):
        parse_node("socks5://server:1080?pushWindow=2")


def test_tls_options() -> None:
    spec = parse_service("phts://:8443?minVersion=VersionTLS12&maxVersion=TLSv1.3&alpn=http/1.1")
    assert spec.tls_options.min_version == "1.2"
    assert spec.tls_options.max_version == "1.3"
    assert spec.tls_options.alpn == ("http/1.1",)
    (node,) = parse_node("phts://s:1?cipherSuites=ECDHE-RSA-AES128-GCM-SHA256").nodes
    assert node.tls.options.cipher_suites == ("ECDHE-RSA-AES128-GCM-SHA256",)
    with pytest.raises(ConfigError, match="minVersion='SSLv3' is not a TLS version"):
        parse_service("phts://:8443?minVersion=SSLv3")


# --- -F ------------------------------------------------------------------------------


def test_relay_over_pht_node() -> None:
    hop = parse_node("relay+pht://server:8443")
    (node,) = hop.nodes
    assert (node.connector, node.dialer) == ("relay", "pht")
    assert node.addr == Address("server", 8443)
    assert node.tls == ClientTLS()
    assert not node.tls.verify


def test_pht_node_is_http_connector() -> None:
    (node,) = parse_node("pht://server:8443").nodes
    assert (node.connector, node.dialer) == ("http", "pht")
    (node,) = parse_node("phts://server:8443").nodes
    assert (node.connector, node.dialer) == ("http", "phts")


def test_socks5_over_pht_node() -> None:
    # gost -L :1080 -F socks5+pht://server:8443
    service = parse_service(":1080")
    (node,) = parse_node("socks5+pht://server:8443").nodes
    assert (service.handler, service.listener) == ("auto", "tcp")
    assert (node.connector, node.dialer) == ("socks5", "pht")


def test_node_options() -> None:
    (node,) = parse_node(
        "socks5+phts://u:p@server:8443?pushPath=/tx&pullPath=/rx&authorizePath=/a"
        "&host=cdn.example&header=X-Key:v1&header=X-Other:%20two"
        "&secure=true&serverName=tunnel.example&caFile=/ca.pem"
    ).nodes
    assert node.paths == PHTPaths(authorize_path="/a", push_path="/tx", pull_path="/rx")
    assert node.host_header == "cdn.example"
    assert node.headers == (("X-Key", "v1"), ("X-Other", "two"))
    assert node.tls == ClientTLS(secure=True, server_name="tunnel.example", ca_file="/ca.pem")
    assert node.auth == Credentials("u", "p")


def test_ca_file_implies_verification() -> None:
    (node,) = parse_node("phts://server:8443?ca=/ca.pem").nodes
    assert node.tls.verify


def test_several_node_addresses_make_one_hop() -> None:
    hop = parse_node("socks5+pht://a:8443,b:8443", name="hop-3")
    assert hop.name == "hop-3"
    assert [node.addr for node in hop.nodes] == [Address("a", 8443), Address("b", 8443)]
    assert [node.name for node in hop.nodes] == ["node-0", "node-1"]


def test_node_without_host_is_localhost() -> None:
    (node,) = parse_node("pht://:8443").nodes
    assert node.addr == Address("localhost", 8443)


# --- errors: one line naming the bad part ----------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "empty"),
        ("socks5+pht://:notaport", "'notaport' is not a number"),
        ("socks5+pht://:70000", "out of range"),
        ("socks5+pht://localhost", "missing port"),
        ("socks5+pht://::1:8443", "brackets"),
        ("socks5+pht://[::1:8443", "missing ']'"),
        ("socks5+pht://:8000-8010", "port ranges"),
        ("socks5+ws://:8443", "listener 'ws' is not supported"),
        ("https://:8443", "listener 'tls' is not supported"),
        ("ss://:8443", "handler 'ss' is not supported"),
        ("tcp://:2222", "needs a target"),
        ("forward+pht://:8443", "needs a target"),
        ("tcp://:2222/10.0.0.5", "missing port"),
        ("a+b+c://:1", "more than two parts"),
        ("http+pht://:8443?backlog=many", "backlog must be an integer"),
        ("http+pht://:8443?admission=127.0.0.1", "'admission' is not supported"),
        ("http+phts://:8443?keyFile=/k.pem", "keyFile given without certFile"),
        ("http+pht://:8443?pushPath=/a%20b", "not a usable request path"),
    ],
)
def test_bad_service(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_service(url)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("", "empty"),
        ("pht://server", "missing port"),
        ("pht://server:0", "out of range"),
        ("pht://", "missing HOST:PORT"),
        ("socks5+wss://server:443", "dialer 'wss' is not supported"),
        ("socks4+pht://server:8443", "connector 'socks4' is not supported"),
        ("pht://server:8443?secure=maybe", "secure must be true or false"),
        ("pht://server:8443?header=NoColon", "Name:Value"),
        ("pht://server:8443?header=Bad%20Name:v", "not a valid header name"),
        ("pht://server:8443?header=X:a%0Db", "line break"),
        ("pht://server:8443?bypass=10.0.0.0/8", "'bypass' is not supported"),
    ],
)
def test_bad_node(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_node(url)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_error_names_the_argument() -> None:
    with pytest.raises(ConfigError, match=r"^-L 'socks5\+pht://:x'"):
        parse_service("socks5+pht://:x")
    with pytest.raises(ConfigError, match=r"^-F 'pht://server'"):
        parse_node("pht://server")


def test_nodelay_elsewhere_than_relay_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pht.cli"):
        parse_service("socks5+pht://:8443?nodelay=true")
        parse_node("http+pht://server:8443?nodelay=true")
    assert "nodelay is a relay handler option" in caplog.text
    assert "nodelay is a relay connector option" in caplog.text


# --- trusted reverse proxies ------------------------------------------------------------


@pytest.mark.parametrize("listener", ["pht", "phts"])
def test_trusted_proxies_are_networks(listener: str) -> None:
    spec = parse_service(f"socks5+{listener}://:8443?trustedProxies=10.0.0.0/8,127.0.0.1,::1")
    assert spec.trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32", "::1/128")


def test_trusted_proxies_default_to_none() -> None:
    assert parse_service("socks5+pht://:8443").trusted_proxies == ()


def test_trusted_proxies_need_a_pht_listener() -> None:
    with pytest.raises(ConfigError, match="trustedProxies needs a pht or phts listener"):
        parse_service("socks5://:1080?trustedProxies=10.0.0.0/8")


@pytest.mark.parametrize("entry", ["proxy.example", "10.0.0.0/33", "10.0.0.1:80"])
def test_trusted_proxies_refuse_what_is_no_address(entry: str) -> None:
    with pytest.raises(ConfigError, match=f"trustedProxies: '{re.escape(entry)}' is not an IP"):
        parse_service(f"socks5+pht://:8443?trustedProxies=127.0.0.1,{entry}")


def test_proxy_protocol_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"option 'proxyProtocol' \(PROXY protocol"):
        parse_service("socks5+pht://:8443?proxyProtocol=1")


@pytest.mark.parametrize("scheme", ["socks5+pht", "socks5", "pht"])
def test_tls_options_on_a_plain_dialer_are_a_warning(
    scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pht.cli"):
        hop = parse_node(f"{scheme}://server:8443?secure=true&serverName=tunnel.example")
    assert hop.nodes[0].tls == ClientTLS()
    assert "used only by a phts dialer: ignored" in caplog.text
    assert "did you mean phts://?" in caplog.text


def test_tls_options_on_a_phts_dialer_say_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pht.cli"):
        hop = parse_node("socks5+phts://server:8443?secure=true&serverName=tunnel.example")
    assert hop.nodes[0].tls == ClientTLS(secure=True, server_name="tunnel.example")
    assert caplog.text == ""
