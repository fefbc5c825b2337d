"""Peak RSS of ``lowrank-ops merge`` against the streaming target ``(N + 1) × largest tensor + 300 MB``.

Generates a base and ``N`` fine-tuned models of ``--model-mb`` MB of fp32 tensors
each in a temp folder (deleted afterwards), runs the CLI under
``/usr/bin/time -v`` (psutil polling of the process when that is missing) and
prints the peak RSS, the target, the interpreter + torch baseline, and the
wall time.  Not part of the test suite (it writes GBs)::

    python benchmarks/merge/bench_cli_rss.py                     # 4 × 500 MB, model_stock
    python benchmarks/merge/bench_cli_rss.py --models 4 --model-mb 500 --method lines --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
MB = 1 << 20


def tensor_plan(model_mb: int) -> list[tuple[str, tuple[int, int]]]:
    """Per model: two big matrices of 1/4 of the budget each, the rest in 1/16 pieces (``layers.<i>.`` names)."""
    floats = model_mb * MB // 4
    cols = 4096
    plan = []
    big = floats // 4 // cols
    plan.append(("model.embed_tokens.weight", (big, cols)))
    plan.append(("lm_head.weight", (big, cols)))
    small = floats // 16 // cols
    for i in range(8):
        plan.append((f"model.layers.{i}.mlp.up_proj.weight", (small, cols)))
    return plan


def write_models(root: Path, n: int, model_mb: int) -> list[Path]:
    plan = tensor_plan(model_mb)
    paths = []
    for j in range(n + 1):
        path = root / ("base" if j == 0 else f"ft{j}")
        path.mkdir()
        g = torch.Generator().manual_seed(j)
        # one shard per model, written tensor by tensor so this script itself stays small
        sd = {}
        for name, shape in plan:
            t = torch.randn(shape, generator=torch.Generator().manual_seed(hash(name) % 2**31))
            if j:
                t += 0.01 * torch.randn(shape, generator=g)
            sd[name] = t
        save_file(sd, str(path / "model.safetensors"))
        del sd
        paths.append(path)
    return paths


def peak_rss_mb(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """``(peak RSS MB, wall s, return code)`` of ``cmd``."""
    t0 = time.time()
    if Path("/usr/bin/time").exists():
        res = subprocess.run(["/usr/bin/time", "-v"] + cmd, env=env, capture_output=True, text=True)
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
        if res.returncode != 0:
            sys.stderr.write(res.stderr[-3000:])
        return int(m.group(1)) / 1024 if m else float("nan"), time.time() - t0, res.returncode
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    p = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, p.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    return peak / MB, time.time() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=4, help="fine-tuned models N (plus one base)")
    ap.add_argument("--model-mb", type=int, default=500, help="MB of fp32 tensors per model")
    ap.add_argument("--method", default="model_stock")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp folder in /tmp)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lro-rss-", dir=args.dir))
    env = dict(os.environ, PYTHONPATH=str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        paths = write_models(root, args.models, args.model_mb)
        cfg = {"merge_method": args.method, "base_model": str(paths[0]),
               "models": [{"model": str(p)} for p in paths[1:]]}
        (root / "merge.yaml").write_text(yaml.safe_dump(cfg))
        largest = max(s[0] * s[1] * 4 for _, s in tensor_plan(args.model_mb)) / MB
        n_inputs = args.models + 1
        target = n_inputs * largest + 300
        base_rss, _, _ = peak_rss_mb([sys.executable, "-c", "import lowrank_ops.cli, lowrank_ops"], env)
        rss, wall, rc = peak_rss_mb([sys.executable, "-m", "lowrank_ops.cli", "merge", str(root / "merge.yaml"),
                                     str(root / "out"), "--no-progress"], env)
        result = {
            "method": args.method, "models": args.models, "model_mb": args.model_mb, "inputs_read": n_inputs,
            "largest_tensor_mb": round(largest, 1), "peak_rss_mb": round(rss, 1), "target_mb": round(target, 1),
            "import_baseline_rss_mb": round(base_rss, 1), "wall_s": round(wall, 1), "returncode": rc,
            "within_target": bool(rss <= target), "torch": torch.__version__, "threads": torch.get_num_threads(),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
