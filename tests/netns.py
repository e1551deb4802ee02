"""Two network namespaces ("hosts") joined by a veth pair, for tests and benchmarks that
send traffic between addresses of their own (needs root and `ip`). Both ends of the pair
are made inside the namespaces: no interface ever appears on the host."""

from __future__ import annotations

import json
import os
import subprocess

import psutil


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


class VethHosts:
    """Namespaces `first` and `second` (named after a tag and this process), addresses
    `first_ip` and `second_ip` on one /`prefix` network."""

    def __init__(self, tag: str, first_ip: str, second_ip: str, prefix: int = 24) -> None:
        pid = os.getpid()
        self.first, self.second = f"hf{tag}{pid}a", f"hf{tag}{pid}b"
        self.veth_first, self.veth_second = f"hf{tag}{pid}x"[:15], f"hf{tag}{pid}y"[:15]
        self.first_ip, self.second_ip, self.prefix = first_ip, second_ip, prefix
        self.created: list[str] = []

    def create(self) -> None:
        for ns in (self.first, self.second):
            ip("netns", "add", ns)
            self.created.append(ns)
        ip("-n", self.first, "link", "add", self.veth_first, "type", "veth",
           "peer", "name", self.veth_second, "netns", self.second)
        for ns, veth, addr in ((self.first, self.veth_first, self.first_ip), (self.second, self.veth_second, self.second_ip)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{addr}/{self.prefix}", "dev", veth)
            ip("-n", ns, "link", "set", veth, "up")

    def mtu(self) -> int | None:
        out = ip("-n", self.first, "-j", "link", "show", self.veth_first, check=False)
        try:
            return json.loads(out.stdout)[0]["mtu"]
        except (ValueError, LookupError):
            return None

    def pids(self) -> set[int]:
        pids: set[int] = set()
        for ns in self.created:
            out = ip("netns", "pids", ns, check=False)
            pids.update(int(p) for p in out.stdout.split() if p.strip().isdigit())
        return pids

    def kill_all(self) -> None:
        """Every process inside our namespaces is ours."""
        for pid in self.pids():
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass

    def delete(self) -> None:
        if self.first in self.created:
            ip("-n", self.first, "link", "del", self.veth_first, check=False)  # takes its peer with it
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        self.created.clear()
