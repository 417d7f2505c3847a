"""The command line's bounded-pull listener options: ``pullMaxBytes`` and ``pullMaxMs``."""

from __future__ import annotations

import json

import pytest

from pht.cli._spec import ConfigError
from pht.cli._url import parse_service
from pht.cli._yaml import parse_config


def test_url_metadata_bounds_the_pulls() -> None:
    spec = parse_service("socks5+pht://:8443?pullMaxBytes=1048576&listener.pullMaxMs=200")
    assert (spec.pull_max_bytes, spec.pull_max_ms) == (1048576, 200)
    assert parse_service("socks5+phts://:8443").pull_max_bytes is None


def test_yaml_listener_metadata_bounds_the_pulls() -> None:
    document = {
        "services": [
            {
                "name": "bounded",
                "addr": ":8443",
                "handler": {"type": "socks5"},
                "listener": {"type": "pht", "metadata": {"pullMaxBytes": 65536, "pullMaxMs": 150}},
            }
        ]
    }
    (service,) = parse_config(json.dumps(document)).services
    assert (service.pull_max_bytes, service.pull_max_ms) == (65536, 150)


@pytest.mark.parametrize("query", ["pullMaxBytes=0", "pullMaxMs=-5", "pullMaxMs=soon"])
def test_bounds_must_be_positive_integers(query: str) -> None:
    with pytest.raises(ConfigError, match="pullMax"):
        parse_service(f"socks5+pht://:8443?{query}")
