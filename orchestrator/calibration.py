"""Calibrating the analytic estimate with llama.cpp's own dry run of the model's file.

The dry run (worker/dry_run.py, `no_alloc` in a child process) runs on a node that holds
the file; its total over the analytic total at the same offload and slot count (the dry
run says how many slots it built, `n_slots`) gives a factor that placement then applies
to need(k) at every slot count. Without llama-cpp-python or on error: factor 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from orchestrator.core.estimate import EstimateOptions, estimate
from orchestrator.core.model_shape import ModelShape

# A dry run that disagrees with the header by more than this is more likely a failed parse
# of llama.cpp's logs than a real difference; keep the analytic figure then.
PLAUSIBLE_FACTORS = (0.5, 2.0)


@dataclass(frozen=True)
class Calibration:
    factor: float
    dry_run_bytes: int
    analytic_bytes: int
    node: str
    gpu_layers: int
    n_slots: int = 1

    @property
    def source(self) -> str:
        return f"llama.cpp dry run on {self.node} (x{self.factor:.2f} of the analytic estimate)"


def calibration_from_dry_run(
    shape: ModelShape, opts: EstimateOptions, gpu_layers: int, dry_run: dict, node: str, gpu: bool
) -> Calibration | None:
    if dry_run.get("error"):
        return None
    dry_total = dry_run["gpu_bytes"] + dry_run["ram_bytes"] + dry_run["mmap_bytes"]
    n_slots = int(dry_run.get("n_slots") or opts.n_slots)
    analytic = estimate(shape, gpu_layers, replace(opts, n_slots=n_slots), gpu=gpu)
    analytic_total = analytic.gpu_bytes + analytic.ram_bytes + analytic.mmap_bytes
    if dry_total <= 0 or analytic_total <= 0:
        return None
    factor = dry_total / analytic_total
    if not PLAUSIBLE_FACTORS[0] <= factor <= PLAUSIBLE_FACTORS[1]:
        return None
    return Calibration(round(factor, 4), dry_total, analytic_total, node, gpu_layers, n_slots)
