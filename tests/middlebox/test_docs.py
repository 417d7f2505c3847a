"""docs/deployment.md shows exactly the configurations the middlebox tests run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from . import harness

DOC = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"


def _fenced_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize(
    "config",
    [
        harness.render_nginx_single(harness.DOC_VALUES["LISTEN"], harness.DOC_VALUES["BACKEND"]),
        harness.render_nginx_scaled(harness.DOC_VALUES["LISTEN"], harness.DOC_BACKENDS),
        harness.render(harness.SQUID_OPEN_RULES, harness.DOC_SQUID_VALUES),
        harness.render(harness.SQUID_AUTH_RULES, harness.DOC_SQUID_VALUES),
    ],
    ids=["nginx-single", "nginx-scaled", "squid", "squid-auth"],
)
def test_documented_config_is_the_tested_one(config: str) -> None:
    assert config in _fenced_blocks(DOC.read_text())


def test_render_refuses_leftover_placeholders() -> None:
    with pytest.raises(ValueError, match="@BACKEND@"):
        harness.render(harness.NGINX_SINGLE_SITE, {"LISTEN": "80"})
