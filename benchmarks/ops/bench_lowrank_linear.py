"""Benchmarks of the lowrank family (lowrank_linear, dora_norm, LoRA/DoRA layers).

Thin entry point: the cases live in ``lowrank_ops.bench.suites.lowrank`` so that
``python -m lowrank_ops.bench`` works from an installed package.  Takes the same
options, e.g.::

    python benchmarks/ops/bench_lowrank_linear.py --quick
    python benchmarks/ops/bench_lowrank_linear.py --filter dora --json
"""
import sys

from lowrank_ops.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "lowrank", *sys.argv[1:]]))
