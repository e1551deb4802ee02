"""Wake-on-LAN, the pure part: MAC addresses, the magic packet, where to broadcast it.

A magic packet is 6 bytes of 0xFF followed by the target's 6-byte MAC 16 times (102
bytes), sent as a UDP broadcast (port 9 by custom) on the sleeping machine's network; its
network card, still powered, wakes the machine when it sees its own MAC repeated so.

No sockets here: orchestrator/wake.py sends what these functions compute.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

MAGIC_PREFIX = b"\xff" * 6
MAC_REPEATS = 16
WAKE_PORT = 9  # "discard": the usual Wake-on-LAN port (7 and 0 are also seen)
LIMITED_BROADCAST = "255.255.255.255"
GUESSED_PREFIX = 24  # a home LAN, when no local interface shares the sleeper's network

_SEPARATED = re.compile(r"^[0-9A-Fa-f]{2}([:-])(?:[0-9A-Fa-f]{2}\1){4}[0-9A-Fa-f]{2}$")
_DOTTED = re.compile(r"^[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}$")  # Cisco style
_BARE = re.compile(r"^[0-9A-Fa-f]{12}$")


def parse_mac(text: str) -> bytes:
    """The 6 bytes of a MAC written `aa:bb:cc:dd:ee:ff`, `AA-BB-...`, `aabb.ccdd.eeff` or
    `aabbccddeeff`. ValueError (naming what was wrong) for anything else, and for MACs no
    card can be woken at: all zeros, broadcast, multicast."""
    cleaned = text.strip()
    if not (_SEPARATED.match(cleaned) or _DOTTED.match(cleaned) or _BARE.match(cleaned)):
        raise ValueError(f"{text!r} is not a MAC address: expected six hex pairs, e.g. 3c:7c:3f:1a:2b:4d")
    raw = bytes.fromhex(re.sub(r"[:.\-]", "", cleaned))
    if raw == b"\x00" * 6:
        raise ValueError(f"{text!r} is all zeros (a loopback or virtual interface has no MAC to wake)")
    if raw[0] & 0x01:
        raise ValueError(f"{text!r} is a multicast or broadcast address, not a network card's")
    return raw


def format_mac(mac: bytes | str) -> str:
    """`aa:bb:cc:dd:ee:ff`, the one spelling homefleet shows and stores."""
    raw = parse_mac(mac) if isinstance(mac, str) else mac
    return ":".join(f"{b:02x}" for b in raw)


def magic_packet(mac: bytes | str) -> bytes:
    """6 x 0xFF, then the MAC 16 times: 102 bytes."""
    raw = parse_mac(mac) if isinstance(mac, str) else mac
    if len(raw) != 6:
        raise ValueError(f"a MAC has 6 bytes, got {len(raw)}")
    return MAGIC_PREFIX + raw * MAC_REPEATS


def broadcast_targets(node_address: str | None, local_networks: Iterable[str] = ()) -> list[str]:
    """Where to send the packet for a machine last seen at `node_address`: the broadcast
    address of the local network (`local_networks`, CIDR like `192.168.1.10/24`, this host's
    interfaces) that holds it, else of its /24; then the limited broadcast 255.255.255.255.
    A sleeping machine has no ARP answer, so a broadcast is the only way to reach it."""
    targets: list[str] = []
    try:
        address = ipaddress.IPv4Address(node_address) if node_address else None
    except ValueError:
        address = None
    if address is not None and not address.is_loopback:
        network = None
        for cidr in local_networks:
            try:
                candidate = ipaddress.IPv4Interface(cidr).network
            except ValueError:
                continue  # IPv6, or a malformed entry
            if address in candidate and candidate.prefixlen < 31:
                network = candidate
                break
        if network is None:
            network = ipaddress.IPv4Network(f"{address}/{GUESSED_PREFIX}", strict=False)
        targets.append(str(network.broadcast_address))
    targets.append(LIMITED_BROADCAST)
    return targets
