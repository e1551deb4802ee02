"""Benchmarks only: with HOMEFLEET_BENCH_FLUSH_S set, worker/replica.py's FLUSH_INTERVAL_S
becomes that value in every Python process that imports it (a replica's Ray worker
inherits the environment of `homefleet up`). Put this directory on PYTHONPATH
(batch_bench --homefleet-flush does). Nothing happens without the variable."""

import os

if os.environ.get("HOMEFLEET_BENCH_FLUSH_S"):
    import importlib.abc
    import importlib.util
    import sys

    class _FlushOverride(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "worker.replica":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.FLUSH_INTERVAL_S = float(os.environ["HOMEFLEET_BENCH_FLUSH_S"])

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _FlushOverride())
