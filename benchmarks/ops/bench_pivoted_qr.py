"""Benchmarks of ``pivoted_qr`` (linalg family).

Thin entry point: the cases live in ``lowrank_ops.bench.suites.linalg`` (see its
docstring for the matrices and what each row compares).  Takes the same options::

    python benchmarks/ops/bench_pivoted_qr.py --quick
    python benchmarks/ops/bench_pivoted_qr.py --threads 1 --json
"""
import sys

from lowrank_ops.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "linalg", "--filter", "pqr", *sys.argv[1:]]))
