"""The MAC of the network card that carries this node's address: what the head sends
Wake-on-LAN to when the machine sleeps (unless `join --wake-mac` names another)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.core.wake_on_lan import format_mac

SYS_NET = Path("/sys/class/net")


def mac_of_address(address: str, sys_net: Path = SYS_NET) -> str | None:
    """`aa:bb:cc:dd:ee:ff` of the interface holding `address`, or None (loopback, a virtual
    interface without one, an address no interface has)."""
    try:
        import psutil

        interfaces = psutil.net_if_addrs()
    except Exception:
        return None
    for name, addresses in interfaces.items():
        if not any(a.address == address for a in addresses):
            continue
        try:
            text = (sys_net / name / "address").read_text().strip()
        except OSError:
            text = next((a.address for a in addresses if a.family == psutil.AF_LINK), "")
        try:
            return format_mac(text)
        except ValueError:
            return None  # loopback (all zeros), a tunnel without a MAC
    return None
