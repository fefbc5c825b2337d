"""``python -m lowrank_ops.bench``: run the registered benchmark suites and print (and optionally save) the table.

Examples::

    python -m lowrank_ops.bench --quick                 # CI smoke run, < 2 min on 2 CPU cores
    python -m lowrank_ops.bench --json                  # full run, saved to benchmarks/results/<device>-<date>.json
    python -m lowrank_ops.bench --filter train --threads 4
    python -m lowrank_ops.bench --device cuda           # bfloat16 by default on CUDA

Exit status 1 when any implementation disagrees with its reference (✗).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK_MIN_RUN_TIME = 0.2
FULL_MIN_RUN_TIME = 2.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lowrank_ops.bench", description="Run the lowrank_ops benchmark suites; print (and optionally save) the table.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: fewer token counts and a short min_run_time")
    p.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                   help="also write header + rows as JSON to PATH (default benchmarks/results/<device>-<date>.json); "
                        "without --json nothing is written")
    p.add_argument("--filter", default=None, metavar="NAME",
                   help="run only cases whose name contains NAME (comma-separated: any of them)")
    p.add_argument("--suite", default=None, help="run only this suite (default: all)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch.set_num_threads(N) first")
    p.add_argument("--min-run-time", type=float, default=None, metavar="S",
                   help=f"seconds of timed calls per row (default {QUICK_MIN_RUN_TIME} with --quick, else {FULL_MIN_RUN_TIME})")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"lowrank_ops.bench: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    import lowrank_ops
    from . import Config, cases, default_json_path, run, write_json

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"lowrank_ops.bench: --device cuda, but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'})"
            )
        if not torch._C._dispatch_has_kernel_for_dispatch_key("lowrank_ops::lowrank_linear", "CUDA"):
            raise SystemExit(
                f"lowrank_ops.bench: --device cuda, but this lowrank_ops build has no CUDA kernels "
                f"(BUILD_INFO: {lowrank_ops.BUILD_INFO!r}); rebuild with LOWRANK_OPS_CUDA=ON"
            )
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    selected = cases(suite=args.suite, filter=args.filter, quick=args.quick)
    if args.list:
        for c in selected:
            print(f"{c.suite:10} {c.name}")
        return 0
    if not selected:
        raise SystemExit(f"lowrank_ops.bench: no case matches suite={args.suite!r} filter={args.filter!r}"
                         f"{' (quick)' if args.quick else ''}; see --list")

    min_run_time = args.min_run_time or (QUICK_MIN_RUN_TIME if args.quick else FULL_MIN_RUN_TIME)
    cfg = Config(device=device, dtype=dtype, quick=args.quick, min_run_time=min_run_time,
                 min_runs=3 if args.quick else 7, warmup=1)
    report = run(cfg, selected)
    if args.json is not None:
        path = args.json or default_json_path(device.type)
        write_json(report, path)
        print(f"wrote {path}")
    return 1 if any(r.check is False for r in report.rows) or report.header.get("failed_cases") else 0


if __name__ == "__main__":
    sys.exit(main())
