"""``lowrank-ops merge``: end to end on tiny generated safetensors models, interruption, and bad configs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import lowrank_ops
from lowrank_ops import merge
from lowrank_ops.cli import main
from lowrank_ops.merge.engine import read_checkpoint

# The child process imports lowrank_ops from where this process did: the installed
# package in CI, or a source tree with a dev build.
PKG_ROOT = Path(lowrank_ops.__file__).resolve().parents[1]
NUM_LAYERS = 3


def make_state(seed: int, *, rows: int = 8, layers: int = NUM_LAYERS, like=None, scale=0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if like is not None:
        return {k: (v + scale * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v.clone()
                for k, v in like.items()}
    sd = {"model.embed_tokens.weight": torch.randn(11, rows, generator=g)}
    for i in range(layers):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(rows, rows, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(2 * rows, rows, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(rows, generator=g)
    sd["model.norm.weight"] = torch.randn(rows, generator=g)
    sd["lm_head.weight"] = torch.randn(11, rows, generator=g)
    sd["model.position_ids"] = torch.arange(5)
    return sd


def write_model(path: Path, sd: dict, shards: int = 1, extras: bool = False) -> Path:
    path.mkdir(parents=True)
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = list(sd)
        wm = {}
        for s in range(shards):
            part = keys[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: sd[k] for k in part}, str(path / fname), metadata={"format": "pt"})
            wm.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    if extras:
        (path / "config.json").write_text(json.dumps({"model_type": "tiny", "num_hidden_layers": NUM_LAYERS}))
        (path / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
        (path / "tokenizer_config.json").write_text("{}")
    return path


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def models(tmp_path):
    base_sd = make_state(0)
    sds = [make_state(i, like=base_sd) for i in (1, 2, 3)]
    base = write_model(tmp_path / "base", base_sd, shards=2, extras=True)
    paths = [write_model(tmp_path / f"ft{i}", sd, shards=1 if i else 3) for i, sd in enumerate(sds)]
    return base_sd, sds, base, paths


def _no_leftovers(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_end_to_end_sharded_in_and_out(tmp_path, models, capsys):
    base_sd, sds, base, paths = models
    cfg = write_config(tmp_path / "c.yaml", {
        "merge_method": "model_stock", "base_model": str(base),
        "models": [{"model": str(base)}] + [{"model": str(p)} for p in paths], "dtype": "float32"})
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--shard-size", "1KB", "--no-progress"]) == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert set(index["weight_map"]) == set(base_sd)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in base_sd.values())
    for f in files:  # every shard is a valid safetensors file holding what the index says
        with safe_open(str(out / f), framework="pt") as h:
            assert sorted(h.keys()) == sorted(k for k, v in index["weight_map"].items() if v == f)
    assert (out / "config.json").read_text() == (base / "config.json").read_text()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    got = read_checkpoint(out)
    ref = merge.model_stock(base_sd, sds)
    for k in base_sd:
        torch.testing.assert_close(got[k], ref[k])
    assert torch.equal(got["model.position_ids"], base_sd["model.position_ids"])
    _no_leftovers(tmp_path, "out.tmp")


TASK_VECTOR_METHODS = {
    "task_arithmetic": {"lambda": 0.7}, "ties": {"density": 0.4}, "dare_linear": {"density": 0.6, "seed": 3},
    "dare_ties": {"density": 0.6, "lambda": 1.3}, "magnitude_prune": {"density": 0.3}, "cabs": {"n": 1, "m": 2},
    "negmerge": {"lambda": 0.5}, "ram": {"epsilon": 0.05, "r": 0.5}, "pcb": {"density": 0.3, "scaling": 0.8},
    "tsv_m": {"scaling": 0.9, "sv_reduction": 0.5},  # a per-task method (register_per_task)
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", sorted(TASK_VECTOR_METHODS))
def test_task_vector_methods_stream_bit_identical(tmp_path, method, dtype, monkeypatch):
    """The engine fills the stacked task vectors one model and one chunk of rows at a time and drops the base
    while the method runs (N + 1 tensors), or for a per-task method reads and reduces one task vector at a
    time; the result equals the state-dict API exactly."""
    from lowrank_ops.merge import engine

    m = merge.get_method(method)
    assert m.delta_fn is not None or m.task_fns is not None
    calls = []
    real = engine.Checkpoint.read_flat_into

    def small_chunks(self, name, out, chunk_bytes=0):  # 2-row chunks: every multi-row tensor is read in pieces
        calls.append(name)
        return real(self, name, out, chunk_bytes=1)

    monkeypatch.setattr(engine.Checkpoint, "read_flat_into", small_chunks)
    base_sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in make_state(0).items()}
    sds = [make_state(i, like=base_sd) for i in (1, 2, 3)]
    base = write_model(tmp_path / "base", base_sd)
    paths = [write_model(tmp_path / f"ft{i}", sd) for i, sd in enumerate(sds)]
    params = TASK_VECTOR_METHODS[method]
    cfg = write_config(tmp_path / "c.yaml", {
        "merge_method": method, "base_model": str(base), "parameters": params,
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, (1.0, 0.5, 2.0))]})
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    got = read_checkpoint(tmp_path / "out")
    ref = merge.get_method(method)(base_sd, sds, weights=[1.0, 0.5, 2.0], **params)
    assert calls and "model.layers.0.mlp.up_proj.weight" in calls
    for k in base_sd:
        assert got[k].dtype == base_sd[k].dtype
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("with_base", [False, True])
def test_lore_reads_models_lazily_and_matches_the_api(tmp_path, monkeypatch, with_base):
    """LoRE (lazy_inputs) gets a sequence that reads model i from disk each time it is indexed: its matrices
    are read again every iteration, the base never (LoRE ignores it), and the result is the API's exactly."""
    from lowrank_ops.merge import engine

    reads = []
    real = engine.Checkpoint.read

    def counting(self, name):
        reads.append((self.path.name, name))
        return real(self, name)

    monkeypatch.setattr(engine.Checkpoint, "read", counting)
    base_sd = make_state(0)
    sds = [make_state(i, like=base_sd) for i in (1, 2, 3)]
    paths = [write_model(tmp_path / f"ft{i}", sd) for i, sd in enumerate(sds)]
    params = {"iters": 3, "mu_rel": 0.2}
    cfg = {"merge_method": "lore", "parameters": params,
           "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, (1.0, 0.5, 2.0))]}
    if with_base:
        cfg["base_model"] = str(write_model(tmp_path / "base", base_sd))
    assert main(["merge", str(write_config(tmp_path / "c.yaml", cfg)), str(tmp_path / "out"), "--no-progress"]) == 0
    got = read_checkpoint(tmp_path / "out")
    ref = merge.lore(None, sds, weights=[1.0, 0.5, 2.0], **params)
    for k in base_sd:
        assert torch.equal(got[k], ref[k]), k
    w = "model.layers.0.mlp.up_proj.weight"
    per_model = [n for p, n in reads if p == "ft0" and n == w]
    assert len(per_model) == 1 + 2 + 3  # the shape probe, two to start (mean, μ), one per iteration
    assert not [n for p, n in reads if p == "base" and n == w]


def test_gradient_and_filter_parameters_and_dtype(tmp_path, models):
    base_sd, sds, base, paths = models
    # t is a gradient over the 3 layers for attention and 1 for everything with "mlp" in its name
    cfg = write_config(tmp_path / "c.yaml", {
        "merge_method": "slerp", "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(paths[0])}],
        "parameters": {"t": [{"filter": "mlp", "value": 1.0}, {"value": [0.0, 1.0]}]}})
    assert main(["merge", str(cfg), str(tmp_path / "out"), "--dtype", "bfloat16", "--no-progress"]) == 0
    got = read_checkpoint(tmp_path / "out")
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert got["model.position_ids"].dtype == torch.int64
    for i, t in enumerate([0.0, 0.5, 1.0]):
        k = f"model.layers.{i}.self_attn.q_proj.weight"
        ref = merge.slerp.merge_tensor(k, base_sd[k], [sds[0][k]], t=t)
        torch.testing.assert_close(got[k], ref.bfloat16())
        k = f"model.layers.{i}.mlp.up_proj.weight"
        torch.testing.assert_close(got[k], sds[0][k].bfloat16())
    # outside the layer stack: embeddings at depth 0, the head at depth 1
    torch.testing.assert_close(got["model.embed_tokens.weight"], base_sd["model.embed_tokens.weight"].bfloat16())
    torch.testing.assert_close(got["lm_head.weight"], sds[0]["lm_head.weight"].bfloat16())


def test_per_model_weights_and_lines_with_inferred_depth(tmp_path, models):
    base_sd, sds, base, paths = models
    cfg = write_config(tmp_path / "c.yaml", {
        "merge_method": "lines", "base_model": str(base),
        "models": [{"model": str(paths[0]), "parameters": {"weight": [1.0, 0.0]}},
                   {"model": str(paths[1]), "parameters": {"weight": 0.5}}],
        "parameters": {"alpha": 0.0, "beta": 1.0}})
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 0  # with the progress bar
    got = read_checkpoint(tmp_path / "out")
    for i in range(NUM_LAYERS):
        k = f"model.layers.{i}.self_attn.q_proj.weight"
        pos = i / (NUM_LAYERS - 1)
        tau = (1.0 - pos) * (sds[0][k] - base_sd[k]) + 0.5 * (sds[1][k] - base_sd[k])
        torch.testing.assert_close(got[k], base_sd[k] + pos * tau)


def test_existing_output_needs_force(tmp_path, models):
    base_sd, sds, base, paths = models
    cfg = write_config(tmp_path / "c.yaml", {"merge_method": "slerp", "models": [{"model": str(paths[0])},
                                                                                 {"model": str(paths[1])}]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", str(cfg), str(out), "--no-progress"]) == 1
    assert (out / "keep.txt").is_file()
    assert main(["merge", str(cfg), str(out), "--no-progress", "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def _bad(tmp_path, capsys, cfg: dict, match: str):
    path = write_config(tmp_path / "bad.yaml", cfg)
    assert main(["merge", str(path), str(tmp_path / "bad_out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert match in err, err
    _no_leftovers(tmp_path, "bad_out")
    return err


def test_bad_configs_write_nothing(tmp_path, models, capsys):
    base_sd, sds, base, paths = models
    two = [{"model": str(paths[0])}, {"model": str(paths[1])}]
    _bad(tmp_path, capsys, {"merge_method": "slurp", "models": two}, "unknown merge method 'slurp'")
    err = _bad(tmp_path, capsys, {"merge_method": "slerp", "models": two, "parameters": {"tt": 0.5}},
               "unknown parameter 'tt'")
    assert "'t'" in err and "dot_threshold" in err
    _bad(tmp_path, capsys, {"merge_method": "pcb", "base_model": str(base),
                            "models": [{"model": str(paths[0]), "parameters": {"densty": 0.5}}]},
         "unknown parameter 'densty' in models[0]")
    _bad(tmp_path, capsys, {"merge_method": "slerp", "models": [{"model": str(tmp_path / "missing")}, two[0]]},
         f"model folder '{tmp_path / 'missing'}' does not exist")
    (tmp_path / "empty").mkdir()
    _bad(tmp_path, capsys, {"merge_method": "slerp", "models": [{"model": str(tmp_path / "empty")}, two[0]]},
         "has no model.safetensors")
    _bad(tmp_path, capsys, {"merge_method": "model_stock", "models": two}, "needs a `base_model`")
    _bad(tmp_path, capsys, {"merge_method": "slerp", "slices": []}, "`slices:`")
    _bad(tmp_path, capsys, {"merge_method": "atlas", "base_model": str(base), "models": two}, "needs the whole model")
    _bad(tmp_path, capsys, {"merge_method": "slerp", "models": two, "parameters": {"t": {"mlp": 1}}}, "parameters.t")
    _bad(tmp_path, capsys, {"merge_method": "slerp", "models": two + [{"model": str(paths[2])}]}, "exactly two models")
    _bad(tmp_path, capsys, {"merge_method": "pcb", "base_model": str(base), "models": two,
                            "parameters": {"density": [{"filter": "mlp", "value": 0.0}, {"value": 0.5}]}},
         "density must lie in (0, 1]")
    # a shard listed in the index is gone
    broken = write_model(tmp_path / "broken", base_sd, shards=2)
    (broken / "model-00002-of-00002.safetensors").unlink()
    _bad(tmp_path, capsys, {"merge_method": "slerp", "models": [{"model": str(broken)}, two[0]]},
         "model-00002-of-00002.safetensors")


def test_shape_and_name_mismatch_name_the_tensor_and_file(tmp_path, models, capsys):
    base_sd, sds, base, paths = models
    wrong = dict(sds[0])
    wrong["model.layers.1.mlp.up_proj.weight"] = torch.randn(3, 3)
    wp = write_model(tmp_path / "wrong_shape", wrong)
    err = _bad(tmp_path, capsys, {"merge_method": "model_stock", "base_model": str(base),
                                  "models": [{"model": str(paths[0])}, {"model": str(wp)}]},
               "tensor 'model.layers.1.mlp.up_proj.weight' has shape [3, 3]")
    assert str(wp / "model.safetensors") in err and "[16, 8]" in err
    fewer = {k: v for k, v in sds[0].items() if k != "model.norm.weight"}
    fp = write_model(tmp_path / "fewer", fewer)
    err = _bad(tmp_path, capsys, {"merge_method": "model_stock", "base_model": str(base),
                                  "models": [{"model": str(paths[0])}, {"model": str(fp)}]},
               "tensor 'model.norm.weight'")
    assert "is missing from model" in err and str(fp) in err
    ints = dict(sds[0])
    ints["model.norm.weight"] = torch.arange(8)
    ip = write_model(tmp_path / "ints", ints)
    _bad(tmp_path, capsys, {"merge_method": "model_stock", "base_model": str(base),
                            "models": [{"model": str(paths[0])}, {"model": str(ip)}]},
         "floating tensors can only be merged with floating tensors")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_killed_run_leaves_nothing(tmp_path, sig):
    # a slow merge (LoRE: many SVDs per tensor) of small files, interrupted while it writes
    sd = {f"model.layers.{i}.w": torch.randn(48, 48) for i in range(200)}
    models = [write_model(tmp_path / f"m{j}", {k: v + 0.1 * torch.randn_like(v) for k, v in sd.items()})
              for j in range(3)]
    cfg = write_config(tmp_path / "c.yaml", {"merge_method": "lore", "models": [{"model": str(m)} for m in models],
                                             "parameters": {"iters": 200, "mu": 1e-9}})
    env = dict(os.environ, PYTHONPATH=str(PKG_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "lowrank_ops.cli", "merge", str(cfg), str(tmp_path / "out"),
                             "--no-progress", "--shard-size", "100KB"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until the merge has written part of its output
            tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
            if tmps and len(list(tmps[0].glob("*.safetensors"))) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        else:
            pytest.fail("the merge did not start writing within 120 s")
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert rc == (130 if sig == signal.SIGINT else 143), err
    assert "nothing was written" in err
    _no_leftovers(tmp_path, "out")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("native", ["converts", "swallows"])
def test_signal_inside_native_code_still_stops_the_merge(sig, native):
    # safetensors' reader turns an exception raised by a signal handler during get_tensor into a ValueError of its
    # own; other native code may swallow it. Either way the merge must stop as interrupted, never as bad input.
    from lowrank_ops.merge.engine import Terminated, _signals_raise

    expected = KeyboardInterrupt if sig == signal.SIGINT else Terminated
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(expected):
        with _signals_raise() as received:
            try:
                os.kill(os.getpid(), sig)
                time.sleep(1)  # the handler runs here
            except BaseException as e:
                if native == "converts":
                    raise ValueError("could not determine the shape") from e
            assert received == [sig]
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["merge", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--device", "--dtype", "--shard-size", "--no-progress", "--force"):
        assert flag in out
