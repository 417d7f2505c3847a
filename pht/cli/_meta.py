"""GOST-style metadata (URL query parameters, YAML ``metadata:`` maps) with typed getters.

GOST's metadata keys are case-insensitive, may carry a component prefix
(``listener.pushPath``, ``dialer.host``, ``tls.certFile``), and the TLS file
keys have short aliases (``cert``, ``key``, ``ca``). This module hides those
rules behind :class:`Metadata`, which also remembers which keys were read so
that the unused ones can be reported: an option GOST has but ``pht`` refuses
is an error, any other unused one a WARNING (never silence).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

from ._options import lookup
from ._spec import Address, ConfigError

__all__ = ["Metadata", "go_duration", "parse_address"]

log = logging.getLogger("pht.cli")

# Prefixes GOST uses to route one query parameter to one component. pht has a
# single consumer per key, so a prefix only raises the key's priority.
_PREFIXES = ("tls.", "listener.", "handler.", "service.", "dialer.", "connector.", "node.", "hop.")
_ALIASES = {"cert": "certfile", "key": "keyfile", "ca": "cafile"}
# Options that restrict who may use a service or where traffic goes. Ignoring
# them silently would make a service more open than its author meant.
_REFUSED = frozenset({"admission", "admissions", "auther", "authers", "bypass", "bypasses"})
# strconv.ParseBool's spellings, which GOST accepts.
_TRUE = frozenset({"1", "t", "true"})
_FALSE = frozenset({"0", "f", "false"})
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _normalize(key: str) -> tuple[str, bool]:
    """Lower-case, drop a component prefix, resolve aliases. Returns (key, had_prefix)."""
    lowered = key.strip().lower()
    prefixed = False
    for prefix in _PREFIXES:
        if lowered.startswith(prefix):
            lowered = lowered[len(prefix) :]
            prefixed = True
            break
    return _ALIASES.get(lowered, lowered), prefixed


class Metadata:
    """A case-insensitive bag of option values from a URL query or a YAML map.

    ``where`` names the source in error messages (``-L 'socks5://:1080?...'``,
    ``services[0].listener.metadata``).
    """

    def __init__(self, items: Iterable[tuple[object, object]], *, where: str) -> None:
        self.where = where
        self._values: dict[str, list[object]] = {}
        self._original: dict[str, str] = {}
        self._prefixed: set[str] = set()
        self._used: set[str] = set()
        for raw_key, value in items:
            if not isinstance(raw_key, str):
                raise ConfigError(f"{where}: option names must be strings, got {raw_key!r}")
            key, prefixed = _normalize(raw_key)
            if key.startswith("header.") and len(key) > len("header."):
                # GOST's header.NAME=VALUE: one extra request header, its
                # name spelled as written (HTTP names are case-insensitive,
                # but some fronts compare them literally).
                original = raw_key.strip()
                name = original[len(original) - len(key) + len("header.") :]
                self._values.setdefault("header", []).append({name: value})
                self._original.setdefault("header", original)
                continue
            if key in _REFUSED:
                raise ConfigError(f"{where}: option {raw_key!r} is not supported by pht")
            if prefixed and key not in self._prefixed:
                # A prefixed key (listener.pushPath) wins over the plain one.
                self._values[key] = []
                self._prefixed.add(key)
            elif not prefixed and key in self._prefixed:
                continue
            self._values.setdefault(key, []).append(value)
            self._original.setdefault(key, raw_key)

    @classmethod
    def from_mapping(cls, mapping: Mapping[object, object] | None, *, where: str) -> Metadata:
        if mapping is None:
            return cls((), where=where)
        return cls(mapping.items(), where=where)

    def merged(self, other: Metadata) -> Metadata:
        """A bag with this one's values, plus ``other``'s for keys this one lacks."""
        combined = Metadata((), where=self.where)
        for source in (other, self):
            for key, values in source._values.items():
                combined._values[key] = list(values)
                combined._original[key] = source._original[key]
        return combined

    def __contains__(self, key: str) -> bool:
        return key.lower() in self._values

    def _name(self, key: str) -> str:
        return self._original.get(key, key)

    def _first(self, key: str) -> object | None:
        key = key.lower()
        values = self._values.get(key)
        self._used.add(key)
        if not values:
            return None
        return values[0]

    def string(self, key: str) -> str | None:
        """A text option; numbers are accepted and converted (YAML ``host: 1234``)."""
        value = self._first(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(
                f"{self.where}: {self._name(key.lower())} must be a string, got {value!r}"
            )
        return str(value)

    def path(self, key: str, default: str) -> str:
        """A request path. Like GOST, a value not starting with '/' means the default."""
        value = self.string(key)
        if value is None or not value.startswith("/"):
            if value:
                log.debug(
                    "%s: %s=%r does not start with '/': using %s",
                    self.where,
                    self._name(key.lower()),
                    value,
                    default,
                )
            return default
        if any(ch in value for ch in " \t\r\n?#"):
            raise ConfigError(
                f"{self.where}: {self._name(key.lower())}={value!r} is not a usable request path"
            )
        return value

    def integer(self, key: str, *, minimum: int | None = None) -> int | None:
        value = self._first(key)
        if value is None:
            return None
        name = self._name(key.lower())
        if isinstance(value, bool):
            raise ConfigError(f"{self.where}: {name} must be an integer, got {value!r}")
        if isinstance(value, int):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            number = int(value)
        else:
            raise ConfigError(f"{self.where}: {name} must be an integer, got {value!r}")
        if minimum is not None and number < minimum:
            raise ConfigError(f"{self.where}: {name} must be at least {minimum}, got {number}")
        return number

    def strings(self, key: str) -> tuple[str, ...]:
        """A list option: a YAML list, or comma-separated text (``alpn=h2,http/1.1``)."""
        value = self._first(key)
        if value is None:
            return ()
        name = self._name(key.lower())
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f"{self.where}: {name} must be a list of strings, got {value!r}")
        return tuple(item.strip() for item in items if item.strip())

    def seconds(self, key: str) -> float | None:
        """A duration: a Go duration (``10s``, ``1m30s``) or a number of seconds."""
        value = self._first(key)
        if value is None:
            return None
        name = self._name(key.lower())
        if isinstance(value, str) and not re.fullmatch(r"\s*\d+(\.\d*)?\s*", value):
            number = go_duration(value, where=f"{self.where}: {name}")
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            number = float(value)
        else:
            raise ConfigError(f"{self.where}: {name} must be a duration (10s), got {value!r}")
        if number <= 0:
            raise ConfigError(f"{self.where}: {name} must be a positive duration")
        return number

    def boolean(self, key: str) -> bool | None:
        value = self._first(key)
        if value is None:
            return None
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(
            f"{self.where}: {self._name(key.lower())} must be true or false, got {value!r}"
        )

    def headers(self, key: str = "header") -> tuple[tuple[str, str], ...]:
        """Extra request headers.

        On a command line: ``header=Name:Value``, repeated for several
        headers. In YAML: a map ``header: {Name: Value}`` (GOST's form), or a
        list of ``"Name: Value"`` strings.
        """
        key = key.lower()
        self._used.add(key)
        name = self._name(key)
        pairs: list[tuple[str, str]] = []
        for value in self._values.get(key, []):
            if isinstance(value, Mapping):
                for header, header_value in value.items():
                    pairs.append(self._header(name, header, header_value))
            elif isinstance(value, str):
                pairs.append(self._header_line(name, value))
            elif isinstance(value, list):
                for item in value:
                    if not isinstance(item, str):
                        raise ConfigError(
                            f"{self.where}: {name} entries must be 'Name: Value' strings, "
                            f"got {item!r}"
                        )
                    pairs.append(self._header_line(name, item))
            else:
                raise ConfigError(
                    f"{self.where}: {name} must be a map of header names to values, got {value!r}"
                )
        return tuple(pairs)

    def _header_line(self, name: str, line: str) -> tuple[str, str]:
        header, sep, value = line.partition(":")
        if not sep:
            raise ConfigError(f"{self.where}: {name}={line!r} must look like Name:Value")
        return self._header(name, header, value)

    def _header(self, name: str, header: object, value: object) -> tuple[str, str]:
        if not isinstance(header, str) or not _HEADER_NAME.match(header.strip()):
            raise ConfigError(f"{self.where}: {name}: {header!r} is not a valid header name")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{self.where}: {name}: value of {header} must be text")
        text = str(value).strip()
        if any(ch in text for ch in "\r\n\0"):
            raise ConfigError(f"{self.where}: {name}: value of {header} contains a line break")
        return header.strip(), text

    def report_unused(self) -> None:
        """Refuse or warn about the options nobody read.

        GOST ignores them silently; a GOST user moving a command to ``pht``
        must hear about an option that changes nothing. One that GOST honours
        and ``pht`` does not implement is an error naming it (the service would
        not be what was written); any other one is a WARNING.
        """
        for key in self._values:
            if key in self._used:
                continue
            name = self._name(key)
            option = lookup(key)
            if option is not None and option.status == "refused":
                raise ConfigError(
                    f"{self.where}: option {name!r} ({option.meaning}) is not supported by pht"
                )
            if option is not None:
                parts = " or ".join(option.parts)
                log.warning(
                    "%s: option %r is a %s option: it has no effect here", self.where, name, parts
                )
            else:
                log.warning("%s: unknown option %r: ignored", self.where, name)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(value: str, *, where: str) -> float:
    """A Go duration (``8760h``, ``1m30s``, ``250ms``) in seconds."""
    text = value.strip()
    position = 0
    seconds = 0.0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise ConfigError(f"{where}: {value!r} is not a duration such as '10s' or '8760h'")
        seconds += float(match.group(1)) * _SECONDS[match.group(2)]
        position = match.end()
    if not text:
        raise ConfigError(f"{where}: empty duration")
    return seconds


def parse_address(
    text: str, *, where: str, default_host: str = "", allow_zero_port: bool = False
) -> Address:
    """Parse ``host:port``, ``[v6]:port`` or ``:port`` (empty host -> ``default_host``)."""
    text = text.strip()
    if not text:
        raise ConfigError(f"{where}: missing address")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError(f"{where}: {text!r}: missing ']' after an IPv6 address")
        host = text[1:end]
        rest = text[end + 1 :]
        if not rest.startswith(":"):
            raise ConfigError(f"{where}: {text!r}: missing port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{where}: {text!r}: missing port (write {text}:PORT)")
        if ":" in host:
            raise ConfigError(f"{where}: {text!r}: write an IPv6 address in brackets, [addr]:port")
    if "-" in port_text and port_text.replace("-", "").isdigit():
        raise ConfigError(f"{where}: {text!r}: port ranges are not supported by pht")
    if not port_text.isdigit():
        raise ConfigError(f"{where}: {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    lowest = 0 if allow_zero_port else 1
    if not lowest <= port <= 65535:
        raise ConfigError(f"{where}: {text!r}: port {port} is out of range")
    if any(ch.isspace() or ch in "/?#@" for ch in host):
        raise ConfigError(f"{where}: {text!r}: {host!r} is not a host name")
    return Address(host or default_host, port)
