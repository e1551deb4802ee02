"""What a process really uses: RSS split into anonymous and file-backed (mmap'd weights), and VRAM."""

from __future__ import annotations

from pathlib import Path


def _status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields = rest.split()
            if len(fields) == 2 and fields[1] == "kB":
                out[key] = int(fields[0])
    except OSError:
        pass
    return out


def measure_process_memory(pid: int, nvml=None) -> dict:
    """RSS (anonymous and file-backed), peak RSS, and VRAM via NVML per process when a GPU exists."""
    status = _status_kib(pid)
    if not status:
        import psutil

        rss = psutil.Process(pid).memory_info().rss
        status = {"VmRSS": rss // 1024}
    if nvml is None:
        from worker.probe import NvmlSession

        nvml = NvmlSession()
    return {
        "rss_bytes": status.get("VmRSS", 0) * 1024,
        "rss_anon_bytes": status.get("RssAnon", 0) * 1024,
        "rss_file_bytes": status.get("RssFile", 0) * 1024,
        "peak_rss_bytes": status.get("VmHWM", 0) * 1024,
        "vram_bytes": nvml.process_vram_bytes(pid),
    }
