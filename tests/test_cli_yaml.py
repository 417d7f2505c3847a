"""-C FILE: GOST's YAML schema gives the same specs as the equivalent -L / -F."""

from __future__ import annotations

import dataclasses
import logging
import sys
import textwrap
from pathlib import Path

import pytest

from pht.cli._spec import (
    Address,
    ClientTLS,
    Config,
    ConfigError,
    Credentials,
    DefaultTLS,
    PHTPaths,
    ServerTLS,
    ServiceSpec,
)
from pht.cli._url import parse_node, parse_service
from pht.cli._yaml import load_config, parse_config


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), source="test.yaml")


def same_service(from_yaml: ServiceSpec, from_url: ServiceSpec) -> None:
    """Equal apart from the chain reference, which only YAML spells out."""
    assert dataclasses.replace(from_yaml, chain=None) == from_url


# --- the YAML twins of GOST's PHT documentation ----------------------------------------


@pytest.mark.parametrize("listener", ["pht", "phts"])
def test_http_over_pht_with_paths(listener: str) -> None:
    config = parse(
        f"""
        services:
        - name: service-0
          addr: ":8443"
          handler:
            type: http
          listener:
            type: {listener}
            metadata:
              authorizePath: /authorize
              pushPath: /push
              pullPath: /pull
        """
    )
    (service,) = config.services
    same_service(
        service,
        parse_service(
            f"http+{listener}://:8443?authorizePath=/authorize&pushPath=/push&pullPath=/pull"
        ),
    )


@pytest.mark.parametrize("handler", ["http", "socks5", "relay"])
@pytest.mark.parametrize("listener", ["pht", "phts"])
def test_proxy_over_pht(handler: str, listener: str) -> None:
    config = parse(
        f"""
        services:
        - name: service-0
          addr: :8443
          handler:
            type: {handler}
          listener:
            type: {listener}
        """
    )
    (service,) = config.services
    same_service(service, parse_service(f"{handler}+{listener}://:8443"))


def test_port_forwarding_over_pht() -> None:
    # gost -L pht://:8443/:1080 -L socks5://:1080
    config = parse(
        """
        services:
        - name: service-0
          addr: :8443
          handler:
            type: forward
          listener:
            type: pht
          forwarder:
            nodes:
            - name: target-0
              addr: :1080
        - name: service-1
          addr: :1080
          handler:
            type: socks5
          listener:
            type: tcp
        """
    )
    first, second = config.services
    same_service(first, parse_service("pht://:8443/:1080"))
    same_service(first, parse_service("forward+pht://:8443/:1080"))
    same_service(second, parse_service("socks5://:1080", name="service-1"))


def test_tcp_forwarding_through_a_pht_chain() -> None:
    # gost -L tcp://:2222/10.0.0.5:22 -F pht://server:8443  (parsed only)
    config = parse(
        """
        services:
        - name: service-0
          addr: :2222
          handler:
            type: tcp
            chain: chain-0
          listener:
            type: tcp
          forwarder:
            nodes:
            - name: target-0
              addr: 10.0.0.5:22
        chains:
        - name: chain-0
          hops:
          - name: hop-0
            nodes:
            - name: node-0
              addr: server:8443
              connector:
                type: http
              dialer:
                type: pht
        """
    )
    (service,) = config.services
    assert service.chain == "chain-0"
    same_service(service, parse_service("tcp://:2222/10.0.0.5:22"))
    assert config.chain("chain-0").hops == (parse_node("pht://server:8443"),)


@pytest.mark.parametrize(("connector", "dialer"), [("socks5", "pht"), ("relay", "pht")])
def test_client_chain(connector: str, dialer: str) -> None:
    # gost -L :1080 -F socks5+pht://server:8443 ; gost -L :1080 -F relay+pht://server:8443
    config = parse(
        f"""
        services:
        - name: service-0
          addr: ":1080"
          handler:
            type: auto
            chain: chain-0
          listener:
            type: tcp
        chains:
        - name: chain-0
          hops:
          - name: hop-0
            nodes:
            - name: node-0
              addr: server:8443
              connector:
                type: {connector}
              dialer:
                type: {dialer}
        """
    )
    (service,) = config.services
    same_service(service, parse_service(":1080"))
    (chain,) = config.chains
    assert chain.hops == (parse_node(f"{connector}+{dialer}://server:8443"),)


def test_full_schema_example() -> None:
    config = parse(
        """
        services:
        - name: svc
          addr: ":8443"
          handler: {type: socks5, auth: {username: u, password: p}, chain: chain-0}
          listener:
            type: phts
            metadata: {pushPath: /tx, pullPath: /rx, backlog: 64}
            tls: {certFile: /c.pem, keyFile: /k.pem, caFile: /ca.pem}
        chains:
        - name: chain-0
          hops:
          - name: hop-0
            nodes:
            - name: node-0
              addr: server:8443
              connector: {type: socks5, auth: {username: cu, password: cp}}
              dialer:
                type: phts
                metadata:
                  pushPath: /push2
                  host: cdn.example
                  header: {X-Key: v, X-Num: 5}
                tls: {secure: true, serverName: tunnel.example, caFile: /ca.pem}
        tls:
          validity: 8760h
          commonName: example.org
          organization: Example
        log:
          level: debug
        """
    )
    (service,) = config.services
    assert service.name == "svc"
    assert service.handler == "socks5"
    assert service.auth == Credentials("u", "p")
    assert service.paths == PHTPaths(push_path="/tx", pull_path="/rx")
    assert service.backlog == 64
    assert service.tls == ServerTLS(cert_file="/c.pem", key_file="/k.pem", ca_file="/ca.pem")
    (node,) = config.chain("chain-0").hops[0].nodes
    assert node.auth == Credentials("cu", "cp")
    assert node.dialer == "phts"
    assert node.paths.push_path == "/push2"
    assert node.host_header == "cdn.example"
    assert node.headers == (("X-Key", "v"), ("X-Num", "5"))
    assert node.tls == ClientTLS(secure=True, server_name="tunnel.example", ca_file="/ca.pem")
    assert config.tls == DefaultTLS(
        common_name="example.org", organization="Example", validity_days=365.0
    )
    assert config.log_level == "DEBUG"


def test_keys_are_case_insensitive() -> None:
    config = parse(
        """
        Services:
        - Addr: ":8443"
          Handler: {Type: HTTP}
          Listener: {Type: PHT, Metadata: {PUSHPATH: /tx}}
        """
    )
    (service,) = config.services
    assert (service.handler, service.listener) == ("http", "pht")
    assert service.paths.push_path == "/tx"
    assert service.name == "service-0"


def test_defaults_when_handler_or_listener_missing() -> None:
    (service,) = parse('services: [{addr: ":1080"}]').services
    assert (service.handler, service.listener) == ("auto", "tcp")


def test_forwarder_targets_list_and_empty_file() -> None:
    (service,) = parse(
        """
        services:
        - addr: :2222
          handler: {type: tcp}
          forwarder: {targets: ["192.0.2.1:22"]}
        """
    ).services
    assert service.targets == (Address("192.0.2.1", 22),)
    assert parse("") == Config()


def test_unknown_keys_are_warned_about_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pht.cli"):
        config = parse(
            """
            api: {addr: ":18080"}
            services:
            - addr: ":8443"
              interface: eth0
              listener: {type: pht, metadata: {keepAlive: true}}
            """
        )
    assert len(config.services) == 1
    assert "unknown key 'api': ignored" in caplog.text
    assert "unknown key 'interface': ignored" in caplog.text
    assert "unknown option 'keepAlive': ignored" in caplog.text


def test_yaml_headers_nodelay_tls_options_metrics_and_log() -> None:
    config = parse(
        """
        services:
        - addr: ":8443"
          handler: {type: relay, metadata: {nodelay: true}}
          listener:
            type: phts
            tls: {options: {minVersion: VersionTLS12, alpn: [http/1.1]}}
        chains:
        - name: c
          hops:
          - nodes:
            - addr: server:8443
              connector: {type: relay, metadata: {nodelay: true, connectTimeout: 5s}}
              dialer:
                type: pht
                metadata:
                  header.ServiceToken: t
                  header: {X-Key: v}
                  proxy: "http://sq:3128"
                  pushWindow: 3
                  resume: true
        metrics: {addr: ":9000"}
        log: {level: warn, format: json, output: stdout}
        """
    )
    (service,) = config.services
    assert service.nodelay
    assert service.tls_options.min_version == "1.2"
    assert service.tls_options.alpn == ("http/1.1",)
    (node,) = config.chains[0].hops[0].nodes
    assert set(node.headers) == {("ServiceToken", "t"), ("X-Key", "v")}
    assert node.nodelay
    assert node.connect_timeout == 5.0
    assert node.proxy == "http://sq:3128"
    assert node.push_window == 3
    assert node.resume
    assert config.metrics is not None
    assert config.metrics.addr.port == 9000
    assert config.metrics.path == "/metrics"
    assert config.log_level == "WARNING"
    assert (config.log_format, config.log_output) == ("json", "stdout")


def test_yaml_refuses_a_gost_option_pht_lacks() -> None:
    with pytest.raises(ConfigError, match=r"option 'udp' .* not supported"):
        parse(
            """
            services:
            - addr: ":8443"
              handler: {type: socks5, metadata: {udp: true}}
            """
        )


def test_json_config_works_too() -> None:
    config = parse('{"services": [{"addr": ":8443", "handler": {"type": "socks5"}}]}')
    assert config.services[0].handler == "socks5"


def test_load_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "gost.yaml"
    path.write_text("services:\n- addr: ':8443'\n  listener: {type: phts}\n")
    (service,) = load_config(str(path)).services
    assert service.listener == "phts"


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("services: {addr: 1}", "services: expected a list, got a map"),
        ("services: [5]", "services[0]: expected a map, got int 5"),
        ("services: [{handler: {type: http}}]", "missing addr"),
        ("services: [{addr: 8443}]", "addr: expected a string, got int 8443"),
        ("services: [{addr: ':x'}]", "is not a number"),
        ("services: [{addr: ':1', handler: {type: [1]}}]", "type: expected a string"),
        ("services: [{addr: ':1', handler: {type: ss}}]", "handler 'ss' is not supported"),
        ("services: [{addr: ':1', handler: {type: nope}}]", "handler 'nope' is not supported"),
        ("services: [{addr: ':1', listener: {type: wss}}]", "listener 'wss' is not supported"),
        ("services: [{addr: ':1', handler: {type: forward}}]", "needs forwarder.nodes"),
        ("services: [{addr: ':1', handler: {chain: c}}]", "unknown chain 'c'"),
        ("services: [{addr: ':1', handler: {auther: a}}]", "auther: not supported"),
        (
            "services: [{addr: ':1', listener: {type: pht, metadata: {backlog: yes}}}]",
            "backlog must be an integer",
        ),
        ("services: [{addr: ':1', listener: {metadata: [1]}}]", "metadata: expected a map"),
        ("services: [{addr: ':1'}, {addr: ':2', name: service-0}]", "two services"),
        ("chains: [{name: c, hops: []}]", "needs at least one hop"),
        ("chains: [{name: c, hops: [{nodes: []}]}]", "at least one node"),
        ("chains: [{hops: [{nodes: [{addr: 's:1', dialer: {type: kcp}}]}]}]", "'kcp'"),
        (
            "chains: [{hops: [{nodes: [{addr: 's:1', dialer: {tls: {secure: sure}}}]}]}]",
            "secure must be true or false",
        ),
        (
            "chains: [{hops: [{nodes: [{addr: 's:1', dialer: {metadata: {header: 5}}}]}]}]",
            "header must be a map",
        ),
        ("tls: {validity: forever}", "not a duration"),
        ("log: {level: loud}", "unknown level"),
        ("[1, 2]", "config: expected a map, got a list"),
        ("services: [", "invalid YAML"),
    ],
)
def test_bad_config(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="bad.yaml")
    message = str(info.value)
    assert message.startswith("bad.yaml: ")
    assert fragment in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(str(tmp_path / "absent.yaml"))


def test_json_config_without_pyyaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `import yaml` fails as it does where PyYAML is not installed.
    monkeypatch.setitem(sys.modules, "yaml", None)
    path = tmp_path / "gost.json"
    path.write_text('{"services": [{"addr": ":8443", "handler": {"type": "relay"}}]}')
    (service,) = load_config(str(path)).services
    assert service.handler == "relay"
    path.write_text("services:\n- addr: ':8443'\n")
    needs_pyyaml = r"reading YAML needs PyYAML: pip install 'pht-tunnel\[cli\]'"
    with pytest.raises(ConfigError, match=needs_pyyaml):
        load_config(str(path))


def test_metrics_auth_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.auth: not supported"):
        parse("metrics: {addr: ':9000', auth: {username: u, password: p}}\nservices: []\n")


@pytest.mark.parametrize("value", ["[10.0.0.0/8, 127.0.0.1]", '"10.0.0.0/8,127.0.0.1"'])
def test_yaml_trusted_proxies_twin_the_url(value: str) -> None:
    config = parse(
        f"""
        services:
        - addr: ":8443"
          handler: {{type: socks5}}
          listener: {{type: pht, metadata: {{trustedProxies: {value}}}}}
        """
    )
    url = parse_service("socks5+pht://:8443?trustedProxies=10.0.0.0/8,127.0.0.1", name="service-0")
    same_service(config.services[0], url)
    assert config.services[0].trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32")


def test_yaml_refuses_trusted_proxies_on_a_tcp_listener() -> None:
    with pytest.raises(ConfigError, match="trustedProxies needs a pht or phts listener"):
        parse(
            """
            services:
            - addr: ":1080"
              handler: {type: socks5}
              listener: {type: tcp, metadata: {trustedProxies: 10.0.0.0/8}}
            """
        )


def test_yaml_refuses_proxy_protocol_in_service_metadata() -> None:
    with pytest.raises(ConfigError, match=r"option 'proxyProtocol' .* not supported"):
        parse(
            """
            services:
            - addr: ":8443"
              handler: {type: socks5}
              listener: {type: pht}
              metadata: {proxyProtocol: 2}
            """
        )


def test_yaml_tls_on_a_plain_pht_dialer_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pht.cli"):
        config = parse(
            """
            services: [{addr: ":1080", handler: {type: socks5, chain: c}}]
            chains:
            - name: c
              hops:
              - nodes:
                - addr: server:8443
                  connector: {type: socks5}
                  dialer: {type: pht, tls: {secure: true, serverName: tunnel.example}}
            """
        )
    assert config.chains[0].hops[0].nodes[0].tls == ClientTLS()
    assert "used only by a phts dialer: ignored" in caplog.text
