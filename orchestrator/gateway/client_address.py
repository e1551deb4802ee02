"""Who sent a request, and whether a keyless request on loopback came from a local program.

- The client is the socket's peer; only when that peer is one of `gateway.trusted_proxies`
  is `X-Forwarded-For` read, right to left past the trusted proxies, and its first other
  address is the client. Anyone else's forwarded headers are ignored.
- Loopback is not proof of a local program: a web page can reach 127.0.0.1 through the
  user's browser, by DNS rebinding (evil.example resolving to 127.0.0.1: the browser then
  sends `Host: evil.example`) or by a cross-site form post (`Origin: https://evil.example`).
  A keyless loopback request must name a local host and come from no foreign page.

Pure functions over strings; the middleware in api_key.py applies them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOCAL_NAMES = frozenset({"localhost"})


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """'10.0.0.5', '10.0.0.0/24', '::1' as networks; ValueError names a bad entry."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/24)") from None
    return tuple(networks)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [::1]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # 1.2.3.4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_trusted(peer: str | None, trusted: tuple[Network, ...]) -> bool:
    address = _address(peer) if peer else None
    return address is not None and any(address in network for network in trusted)


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str | None:
    """The request's client: the peer, or, when the peer is a trusted proxy, the address
    that proxy was given (X-Forwarded-For read from the right, past trusted proxies). An
    entry that is not an address is returned as it is: it is no loopback address."""
    if not trusted or not is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            address = _address(hop)
            return str(address) if address is not None else hop
    return str(_address(hops[0])) if hops and _address(hops[0]) else peer


def host_name(host: str) -> str:
    """The name part of a Host header or URL authority, lower case: '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.index("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_local_name(name: str, local_names: frozenset[str]) -> bool:
    """A loopback address, `localhost` or a name under `.localhost` (browsers resolve those to
    loopback themselves), or one of this machine's own names."""
    if not name:
        return False
    if name in LOCAL_NAMES or name.endswith(".localhost") or name in local_names:
        return True
    address = _address(name)
    return address is not None and address.is_loopback


def local_names(configured_host: str | None, hostname: str | None) -> frozenset[str]:
    """This machine's names a local client may address: the host the gateway binds to (not a
    wildcard such as 0.0.0.0, which is no name) and the machine's hostname."""
    names = set()
    for name in (configured_host, hostname):
        if not name:
            continue
        name = host_name(name)
        address = _address(name)
        if address is not None and address.is_unspecified:
            continue
        names.add(name)
    return frozenset(names)


def origin_is_local(origin: str, local: frozenset[str], allowed_origins: Iterable[str] = ()) -> bool:
    """Whether a browser page of this origin may use keyless loopback access: a page served
    from a local name, or one of the configured CORS origins ('*' allows any). 'null' (a
    sandboxed frame, a file) is not local."""
    allowed = set(allowed_origins)
    if "*" in allowed or origin in allowed:
        return True
    if origin == "null":
        return False
    return is_local_name(host_name(urlsplit(origin).netloc.rpartition("@")[2]), local)
