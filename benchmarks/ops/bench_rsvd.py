"""Benchmarks of ``rsvd`` (linalg family).

Thin entry point: the cases live in ``lowrank_ops.bench.suites.linalg`` (see its
docstring for the matrices and what each row compares).  Takes the same options::

    python benchmarks/ops/bench_rsvd.py --quick
    python benchmarks/ops/bench_rsvd.py --threads 1 --json
"""
import sys

from lowrank_ops.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "linalg", "--filter", "rsvd", *sys.argv[1:]]))
