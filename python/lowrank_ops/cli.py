"""The ``lowrank-ops`` command line.

    lowrank-ops merge CONFIG.yaml OUT_DIR [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                      [--shard-size 5GB] [--no-progress] [--force]

(also ``python -m lowrank_ops.cli merge ...``).  Subcommands register in
:data:`SUBCOMMANDS`; each adds its arguments to a subparser and returns an exit
code.  Exit codes: 0 success, 1 bad input (nothing written), 130 interrupted by
Ctrl-C, 143 terminated by SIGTERM (nothing written in either case).
"""
from __future__ import annotations

import argparse
import ctypes
import sys
from typing import Callable, Optional, Sequence


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge checkpoints as a mergekit-style YAML config says",
                       description="Merge safetensors checkpoints tensor by tensor, as CONFIG (mergekit-style YAML) "
                                   "says; writes sharded safetensors + model.safetensors.index.json to OUT_DIR "
                                   "atomically.")
    p.add_argument("config", help="YAML merge config (merge_method, models, base_model, parameters, dtype)")
    p.add_argument("out_dir", help="output folder (must not exist or be empty, unless --force)")
    p.add_argument("--device", default="cpu", help="device for the arithmetic: cpu (default) or cuda[:i]")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="output dtype of floating tensors (default: the config's dtype, else the input's)")
    p.add_argument("--shard-size", default="5GB", help="maximum output shard size, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty OUT_DIR")
    p.set_defaults(func=_run_merge)


def fixed_mmap_threshold(nbytes: int = 4 << 20) -> bool:
    """Have glibc serve every allocation of ``nbytes`` or more by its own ``mmap``, unmapped when freed.

    By default glibc raises its mmap threshold to the size of each mmapped block freed (up to 32 MB); blocks
    below the raised threshold then come from the heap, where a freed block amid live ones stays resident.
    Over a merge of many tensors that kept ~240 MB resident in vain (TSV-M on 4 × 500 MB models: 1132 MB peak
    RSS, 895 MB with a fixed threshold).  ``mallopt(M_MMAP_THRESHOLD)`` fixes the threshold (and so turns the
    raising off) for this process; the CLI calls it, the library never does.  False where there is no glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _run_merge(args: argparse.Namespace) -> int:
    import lowrank_ops  # noqa: F401  (registers every merge method)
    from lowrank_ops.merge.config import ConfigError
    from lowrank_ops.merge.engine import MergeError, Terminated, merge_checkpoints

    fixed_mmap_threshold()
    try:
        out = merge_checkpoints(args.config, args.out_dir, device=args.device, dtype=args.dtype,
                                shard_size=args.shard_size, progress=not args.no_progress, force=args.force)
    except (ConfigError, MergeError) as e:
        print(f"lowrank-ops merge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lowrank-ops merge: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("lowrank-ops merge: terminated; nothing was written", file=sys.stderr)
        return 143
    print(f"lowrank-ops merge: wrote {out}", file=sys.stderr)
    return 0


#: name -> function adding the subcommand's parser (each sets ``func`` returning an exit code).
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {"merge": _add_merge}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank-ops", description="lowrank_ops command line tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS.values():
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
