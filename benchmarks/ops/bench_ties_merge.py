"""Benchmarks of the merge family (ties_merge, dare_merge vs the stack-and-sort / mergekit way).

Thin entry point: the cases live in ``lowrank_ops.bench.suites.merge``.  Same
options as ``python -m lowrank_ops.bench``, e.g.::

    python benchmarks/ops/bench_ties_merge.py --quick
    python benchmarks/ops/bench_ties_merge.py --filter dare --json
"""
import sys

from lowrank_ops.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "merge", *sys.argv[1:]]))
