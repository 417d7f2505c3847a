"""The command line's resume settings on a PHT listener.

``resume=false``, ``resumeWindow``, ``gracePeriod`` and ``legacyGrace``
reach the server: parsed from a URL and from YAML, refused with a message
when out of range or on a tcp listener, and seen on the wire in the answer a
``pht -L`` process gives to an opening pull that offers the extension.
"""

from __future__ import annotations

import json
import secrets

import pytest

from pht.cli._spec import ConfigError, ListenerResume
from pht.cli._url import parse_service
from pht.cli._yaml import parse_config

from .raw_http import RawPull, resume_headers
from .support import tcp_echo_server
from .test_cli_run import PhtProcess

OFFER = [("PHT-Resume", "1")]


def test_a_listener_serves_resume_with_the_library_defaults() -> None:
    spec = parse_service("forward+pht://:8080/127.0.0.1:22")
    assert spec.resume == ListenerResume()
    assert spec.resume.keywords() == {"resume": True, "legacy_grace": False}


def test_url_metadata_sets_every_resume_knob() -> None:
    spec = parse_service(
        "forward+pht://:8080/127.0.0.1:22"
        "?gracePeriod=2m&resumeWindow=1048576&listener.legacyGrace=true"
    )
    assert spec.resume == ListenerResume(window=1048576, grace_period=120, legacy_grace=True)
    assert spec.resume.keywords() == {
        "resume": True,
        "legacy_grace": True,
        "resume_window": 1048576,
        "grace_period": 120,
    }
    assert parse_service("socks5+phts://:8443?resume=false").resume.enabled is False


def test_yaml_listener_metadata_sets_the_resume_knobs() -> None:
    document = {
        "services": [
            {
                "name": "tunnel",
                "addr": ":8080",
                "handler": {"type": "socks5"},
                "listener": {
                    "type": "pht",
                    "metadata": {"gracePeriod": "30s", "legacyGrace": True, "resume": True},
                },
            }
        ]
    }
    (service,) = parse_config(json.dumps(document)).services
    assert service.resume == ListenerResume(grace_period=30, legacy_grace=True)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("gracePeriod=1.5s", "gracePeriod must be whole seconds"),
        ("gracePeriod=2h", r"grace must be in \[1, 3600\] seconds"),
        ("resumeWindow=1000", r"resume window must be in \[65536, 67108864\] bytes"),
        ("resumeWindow=lots", "resumeWindow must be an integer"),
        ("legacyGrace=maybe", "legacyGrace"),
    ],
)
def test_out_of_range_settings_are_refused(query: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_service(f"forward+pht://:8080/127.0.0.1:22?{query}")


def test_a_tcp_listener_refuses_resume_settings() -> None:
    with pytest.raises(ConfigError, match="need a pht or phts listener"):
        parse_service("tcp://:8080/127.0.0.1:22?gracePeriod=10s")


def _offered_pull(port: int) -> dict[bytes, bytes]:
    """The resume headers of a ``pht -L`` answer to an opening pull that offers resume."""
    with RawPull(port, "/pull", secrets.token_hex(16), OFFER) as pull:
        assert pull.status == 200
        return resume_headers(pull.headers)


@pytest.mark.slow
def test_the_settings_reach_the_server_on_the_wire() -> None:
    with tcp_echo_server() as echo:
        target = f"127.0.0.1:{echo}"
        query = "gracePeriod=7s&resumeWindow=131072"
        with PhtProcess("-L", f"pht://127.0.0.1:0/{target}?{query}") as server:
            granted = _offered_pull(server.port())
        with PhtProcess("-L", f"pht://127.0.0.1:0/{target}?resume=false") as server:
            refused = _offered_pull(server.port())
    assert granted[b"pht-resume"] == b"1; window=131072; grace=7"
    assert refused == {}
