"""Benchmarks of the factored/updating SVDs (factored_svd, svd_update, svd_append incl. sparse C).

Thin entry point: the cases live in ``lowrank_ops.bench.suites.linalg_update``.
Same options as ``python -m lowrank_ops.bench``, e.g.::

    python benchmarks/ops/bench_svd_update.py --quick
    python benchmarks/ops/bench_svd_update.py --filter 4096 --threads 1 --json
"""
import sys

from lowrank_ops.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "linalg_update", *sys.argv[1:]]))
