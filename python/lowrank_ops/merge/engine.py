"""Streaming merge of safetensors checkpoints, one tensor at a time.

``merge_checkpoints(config, out_dir)`` runs a :class:`~lowrank_ops.merge.config.MergeConfig`:

1. **Validate everything before writing anything**: model folders and their
   safetensors files exist (``model.safetensors``, or shards listed in
   ``model.safetensors.index.json``), every model has the same tensor names,
   shapes agree, a tensor is floating in all models or in none, the method is
   known and streamable, its parameters are known (checked when the config is
   parsed), the device exists.
2. Plan the output shards from the tensors' sizes (``shard_size`` bytes each).
3. For each tensor, read it from the base and from every model (lazily, with
   ``safetensors.safe_open``; never a pickle), call the method's per-tensor
   function, and append the result to the open shard.  Only the current
   tensor's inputs are alive, so peak memory is about ``(N + 1)`` tensors plus
   the method's working set.  The inputs belong to the engine, which says so
   with :func:`~lowrank_ops.merge._common.owned_inputs`: a method may then
   write its result into the base tensor's storage (``model_stock`` does).
4. Everything goes into a temp folder next to ``out_dir`` that is renamed to
   ``out_dir`` at the end; an error, Ctrl-C or SIGTERM removes it, so there is
   never a partial ``out_dir``.

Shards are written by a small streaming safetensors writer rather than
``safetensors.torch.save_file``: ``save_file`` takes a whole shard as a dict of
tensors, which would keep up to ``shard_size`` bytes of results in memory.  The
header (names, dtypes, shapes, offsets) is known from the plan, so it is written
first and each tensor's bytes are appended as soon as they are computed; the
files are ordinary safetensors (read back with ``safe_open`` in the tests).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import tempfile
from collections import abc
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from safetensors import safe_open

from ._common import owned_inputs
from .config import ConfigError, MergeConfig, infer_num_layers, parse_config

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: Non-weight files copied from the base model (or ``tokenizer_source``) when present.
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
              "chat_template.jinja")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
for _n, _a in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _a):
        _ST_DTYPES[_n] = getattr(torch, _a)
        _ST_NAMES[getattr(torch, _a)] = _n


class MergeError(RuntimeError):
    """A merge that cannot run (bad inputs); nothing was written."""


class Terminated(BaseException):
    """Raised inside the merge when SIGTERM arrives, so cleanup runs as for Ctrl-C."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple
    dtype: torch.dtype
    file: str

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class Checkpoint:
    """A model folder of safetensors files, read lazily tensor by tensor."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MergeError(f"model folder {str(self.path)!r} does not exist")
        index = self.path / INDEX_NAME
        single = self.path / WEIGHTS_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise MergeError(f"{index}: not a safetensors index (no weight_map): {e}") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [WEIGHTS_NAME]
            weight_map = None
        else:
            found = sorted(p.name for p in self.path.glob("*.safetensors"))
            if len(found) == 1:
                files = found
                weight_map = None
            else:
                legacy = sorted(p.name for p in self.path.glob("*.bin"))
                hint = f" (found {legacy}: pickled checkpoints are not read; convert them to safetensors)" if legacy else ""
                raise MergeError(f"model folder {str(self.path)!r} has no {WEIGHTS_NAME} and no {INDEX_NAME}{hint}")
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise MergeError(f"{index} lists shard {fname!r} but {fpath} does not exist")
            try:
                with safe_open(str(fpath), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        st = sl.get_dtype()
                        if st not in _ST_DTYPES:
                            raise MergeError(f"{fpath}: tensor {key!r} has unsupported dtype {st}")
                        self.tensors[key] = TensorInfo(key, tuple(sl.get_shape()), _ST_DTYPES[st], str(fpath))
            except MergeError:
                raise
            except Exception as e:  # safetensors raises its own error types on corrupt headers
                raise MergeError(f"{fpath}: cannot read safetensors header: {e}") from None
        if weight_map is not None:
            for key, fname in weight_map.items():
                info = self.tensors.get(key)
                if info is None or Path(info.file).name != fname:
                    raise MergeError(f"{index} maps tensor {key!r} to {fname!r} but that file does not hold it")

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        # A fresh handle per tensor, closed right away: the pages safetensors maps for a tensor stay
        # resident (and count in RSS) while its file is open, so a handle kept open for the whole merge
        # grows RSS to the size of every model (measured: 2.8 GB instead of 0.9 GB for 5 × 500 MB).
        with safe_open(self.tensors[name].file, framework="pt") as f:
            return f.get_tensor(name)

    def read_flat_into(self, name: str, out: torch.Tensor, chunk_bytes: int = 32 << 20) -> None:
        """Read tensor ``name`` flattened into ``out`` (``(numel,)``, any dtype and device: converted), in
        chunks of leading-dim rows of about ``chunk_bytes``, each through a handle of its own, so that besides
        ``out`` at most one chunk of the tensor is ever resident."""
        info = self.tensors[name]
        rows = info.shape[0] if info.shape else 0
        numel = out.numel()
        if rows <= 1 or numel * info.dtype.itemsize <= chunk_bytes:
            out.copy_(self.read(name).reshape(-1))
            return
        row = numel // rows
        per = max(1, chunk_bytes // max(1, row * info.dtype.itemsize))
        for a in range(0, rows, per):
            b = min(rows, a + per)
            with safe_open(info.file, framework="pt") as f:
                piece = f.get_slice(name)[a:b]
            out[a * row:b * row].copy_(piece.reshape(-1))
            del piece

    def close(self) -> None:
        """Nothing stays open between reads; kept for symmetry."""


def parse_size(size: Union[str, int]) -> int:
    """``"5GB"`` -> 5·10⁹ bytes, ``"500MiB"`` -> 500·2²⁰; plain ints are bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise MergeError(f"shard size {size!r} is not a size like 5GB, 500MB or 2GiB")
    num, unit, binary = m.groups()
    base = 1024 if binary else 1000
    return int(float(num) * base ** "_KMGT".index(unit or "_"))


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front; tensors are appended in plan order."""

    def __init__(self, path: Path, infos: list[tuple[str, tuple, torch.dtype]], metadata: Optional[dict] = None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self.expected = []
        for name, shape, dtype in infos:
            nbytes = torch.empty((), dtype=dtype).element_size()
            for s in shape:
                nbytes *= s
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, tuple(shape), dtype, nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = path
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(blob)))
        self.f.write(blob)
        self.i = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        ename, shape, dtype, nbytes = self.expected[self.i]
        if name != ename or tuple(t.shape) != shape or t.dtype != dtype:
            raise MergeError(f"internal: shard {self.path.name} expected {ename} {shape} {dtype}, "
                             f"got {name} {tuple(t.shape)} {t.dtype}")
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            self.f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.i += 1

    def close(self) -> None:
        if self.i != len(self.expected):
            raise MergeError(f"internal: shard {self.path.name} closed after {self.i}/{len(self.expected)} tensors")
        self.f.close()


@contextmanager
def _signals_raise():
    """While the merge runs (main thread only), SIGTERM raises :class:`Terminated` and SIGINT raises
    :class:`KeyboardInterrupt`.  The signal is also recorded: native code (safetensors' reader, for one) may turn
    the exception raised inside it into an error of its own, so on the way out a recorded signal wins over
    whatever exception surfaced, and a run whose exception was swallowed is stopped before it publishes."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(f"received signal {signum}")

    try:
        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread
        yield received
        return
    try:
        yield received
    except BaseException as e:
        if received and not isinstance(e, (Terminated, KeyboardInterrupt)):
            raise _signal_exception(received[0]) from e
        raise
    else:
        if received:
            raise _signal_exception(received[0])
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _signal_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(f"received signal {signum}")


def _floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def validate(cfg: MergeConfig, device: str = "cpu") -> tuple[Optional[Checkpoint], list[Checkpoint], list[TensorInfo]]:
    """Open every checkpoint and check names, shapes and dtypes agree; returns ``(base, models, reference infos)``."""
    method = cfg.method
    if not method.streamable:
        raise MergeError(f"merge method {method.name!r} needs the whole model at once (it has no per-tensor form); "
                         f"call lowrank_ops.merge.{method.name}(...) from Python instead")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError(f"--device {device}: no CUDA device is available")
    base_spec = cfg.base_spec()
    base = Checkpoint(base_spec.path) if base_spec is not None else None
    models = [Checkpoint(m.path) for m in cfg.task_models()]
    ref = base if base is not None else models[0]
    ref_file = lambda n: ref.tensors[n].file  # noqa: E731
    for ck in ([base] if base is not None else []) + models:
        if ck is ref:
            continue
        missing = [n for n in ref.tensors if n not in ck.tensors]
        if missing:
            raise MergeError(f"tensor {missing[0]!r} (in {ref_file(missing[0])}) is missing from model {ck.path}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [n for n in ck.tensors if n not in ref.tensors]
        if extra:
            raise MergeError(f"tensor {extra[0]!r} in {ck.tensors[extra[0]].file} is not in {ref.path}"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for n, info in ck.tensors.items():
            r = ref.tensors[n]
            if info.shape != r.shape:
                raise MergeError(f"tensor {n!r} has shape {list(info.shape)} in {info.file} but {list(r.shape)} "
                                 f"in {r.file}")
            if _floating(info.dtype) != _floating(r.dtype):
                raise MergeError(f"tensor {n!r} is {info.dtype} in {info.file} but {r.dtype} in {r.file}; "
                                 "floating tensors can only be merged with floating tensors")
    return base, models, list(ref.tensors.values())


def plan_shards(infos: list[TensorInfo], out_dtype: Optional[torch.dtype], shard_size: int):
    """Greedy shards of at most ``shard_size`` bytes (a bigger tensor gets a shard of its own)."""
    shards: list[list[tuple[str, tuple, torch.dtype]]] = [[]]
    used = 0
    for info in infos:
        dtype = out_dtype if (out_dtype is not None and _floating(info.dtype)) else info.dtype
        nbytes = torch.empty((), dtype=dtype).element_size()
        for s in info.shape:
            nbytes *= s
        if shards[-1] and used + nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append((info.name, info.shape, dtype))
        used += nbytes
    return shards


def merge_checkpoints(config: Union[MergeConfig, dict, str, os.PathLike], out_dir: Union[str, os.PathLike], *,
                      device: str = "cpu", dtype: Optional[str] = None, shard_size: Union[str, int] = "5GB",
                      progress: bool = True, force: bool = False, copy_files: Iterable[str] = COPY_FILES) -> Path:
    """Merge the checkpoints a config names into ``out_dir`` (sharded safetensors + index), atomically.

    Raises :class:`MergeError` / :class:`~lowrank_ops.merge.config.ConfigError` before writing anything when an
    input is wrong; on any error or interruption no ``out_dir`` (and no temp folder) is left behind.
    """
    cfg = config if isinstance(config, MergeConfig) else parse_config(config)
    method = cfg.method
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise MergeError(f"output folder {str(out)!r} exists and is not empty (pass --force to replace it)")
    shard_bytes = parse_size(shard_size)
    if shard_bytes <= 0:
        raise MergeError(f"shard size must be positive, got {shard_size!r}")
    out_dtype = cfg.torch_dtype(dtype)
    base, models, infos = validate(cfg, device)
    try:
        num_layers = cfg.parameters.get("num_layers")
        if not isinstance(num_layers, int):
            num_layers = infer_num_layers(i.name for i in infos)
        # resolve every tensor's parameters now, so a bad value fails before anything is written
        calls = []
        for info in infos:
            weights, params = cfg.tensor_params(info.name, num_layers)
            if "num_layers" in method.params and params.get("num_layers") is None:
                params["num_layers"] = num_layers
            calls.append((weights, params))
        _probe(method, infos, calls, base is not None, len(models))
        shards = plan_shards(infos, out_dtype, shard_bytes)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            with _signals_raise() as received:
                _run(cfg, base, models, infos, calls, shards, tmp, device, progress, copy_files, received)
                if received:  # a signal whose exception some native code swallowed: never publish
                    raise _signal_exception(received[0])
                _publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for ck in ([base] if base is not None else []) + models:
            ck.close()
    return out


def _probe(method, infos, calls, has_base: bool, n: int) -> None:
    """Run the method on small random stand-ins once per distinct parameter set, so that a model count or a
    parameter value the method rejects fails before anything is written."""
    seen = set()
    g = torch.Generator().manual_seed(0)
    for info, (weights, params) in zip(infos, calls):
        if not _floating(info.dtype):
            continue
        key = (len(info.shape) >= 2, repr(weights), repr(sorted(params.items(), key=lambda kv: kv[0])))
        if key in seen:
            continue
        seen.add(key)
        if len(seen) > 256:
            break
        shape = (6, 5) if len(info.shape) >= 2 else (5,)
        b = torch.randn(shape, generator=g) if has_base else None
        ts = [torch.randn(shape, generator=g) for _ in range(n)]
        try:
            method.merge_tensor(info.name, b, ts, weights, **params)
        except (ValueError, TypeError) as e:
            raise MergeError(f"merge method {method.name!r} rejects the inputs for tensor {info.name!r}: {e}") from None


def _run(cfg, base, models, infos, calls, shards, tmp: Path, device, progress, copy_files,
         received: Sequence[int] = ()) -> None:
    from tqdm.auto import tqdm

    method = cfg.method
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    total = 0
    by_name = {info.name: (info, call) for info, call in zip(infos, calls)}
    bar = tqdm(total=sum(i.nbytes for i in infos), unit="B", unit_scale=True, desc=f"merge ({method.name})",
               disable=not progress, dynamic_ncols=True)
    try:
        for fname, shard in zip(names, shards):
            writer = ShardWriter(tmp / fname, shard, {"format": "pt", "merge_method": method.name})
            try:
                for name, shape, dtype in shard:
                    if received:  # a signal whose exception some native code swallowed
                        raise _signal_exception(received[0])
                    info, (weights, params) = by_name[name]
                    try:
                        if _floating(info.dtype) and method.delta_fn is not None and base is not None:
                            merged = _merge_task_vectors(method, name, base, models, weights, params, device)
                        elif _floating(info.dtype) and method.task_fns is not None and base is not None:
                            merged = _merge_per_task(method, name, base, models, weights, params, device)
                        else:
                            merged = _merge_read_all(method, name, info, base, models, weights, params, device)
                    except (ValueError, TypeError, RuntimeError) as e:
                        raise MergeError(f"merge method {method.name!r} failed on tensor {name!r}: {e}") from e
                    writer.write(name, merged.to(dtype))
                    del merged
                    weight_map[name] = fname
                    total += writer.expected[writer.i - 1][3]
                    bar.update(info.nbytes)
            finally:
                writer.f.close()
            writer.close()
    finally:
        bar.close()
    index = {"metadata": {"total_size": total, "merge_method": method.name},
             "weight_map": weight_map}
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
    src = Path(cfg.base_spec().path) if cfg.base_model is not None else Path(cfg.task_models()[0].path)
    tok = Path(cfg.tokenizer_source) if cfg.tokenizer_source else src
    for fname in copy_files:
        origin = (tok if fname != "config.json" and fname != "generation_config.json" else src) / fname
        if origin.is_file():
            shutil.copyfile(origin, tmp / fname)


class _LazyTensors(abc.Sequence):
    """Model ``i``'s tensor ``name``, read from disk each time it is indexed (for ``lazy_inputs`` methods)."""

    def __init__(self, models, name, device):
        self.models, self.name, self.device = models, name, device

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.models[i].read(self.name).to(self.device)


def _merge_read_all(method, name, info, base, models, weights, params, device) -> torch.Tensor:
    """Any method: read the base and every model's tensor, merge.  N + 1 tensors plus the method's workspace;
    a ``lazy_inputs`` method instead reads model ``i`` whenever it indexes it (and a base only if it needs one)."""
    lazy = method.lazy_inputs and _floating(info.dtype)
    b = base.read(name).to(device) if base is not None and (method.needs_base or not lazy) else None
    ts = _LazyTensors(models, name, device) if lazy else [m.read(name).to(device) for m in models]
    if not _floating(info.dtype):
        return b if b is not None else ts[0]
    with owned_inputs():  # b and ts are ours: a method may reuse b's storage
        return method.merge_tensor(name, b, ts, weights, **params)


def _merge_task_vectors(method, name, base, models, weights, params, device) -> torch.Tensor:
    """A task-vector method (``θ_base + λ·f(τ)``, :func:`register_delta`) in N + 1 tensors: the stacked
    deltas are filled one model at a time, chunk by chunk, against the base; the base is dropped while ``f``
    runs (the deltas and ``f``'s output are the N + 1) and read again to add ``λ·f(τ)``.  Bit-identical to
    the per-tensor form (the same fp32/fp64 subtraction, scale and sum)."""
    shape, like, wd = _layout(models, name)
    b = base.read(name).to(device=device, dtype=wd).reshape(-1)
    deltas = torch.empty((len(models), b.numel()), dtype=wd, device=device)
    for i, m in enumerate(models):
        m.read_flat_into(name, deltas[i])
        deltas[i].sub_(b)
    del b
    merged, lam = method.merged_delta(name, deltas, weights, shape, **params)
    del deltas
    return _add_base(merged, lam, base, name, shape, like, device)


def _layout(models, name):
    """``(shape, stored dtype, work dtype)`` of tensor ``name`` (the work dtype: fp64 stays fp64, else fp32)."""
    first = models[0].tensors[name]
    return first.shape, first.dtype, torch.float64 if first.dtype == torch.float64 else torch.float32


def _add_base(merged, lam, base, name, shape, like, device) -> torch.Tensor:
    """``θ_base + λ·f`` with the base read again, in ``f``'s buffer (the API's ``apply_delta``, bit for bit)."""
    out = merged.reshape(shape)
    if lam != 1:
        out.mul_(lam)
    out.add_(base.read(name).to(device=device, dtype=out.dtype))
    return out.to(like)


def _merge_per_task(method, name, base, models, weights, params, device) -> torch.Tensor:
    """A per-task method (:func:`register_per_task`, e.g. TSV-M): one task vector at a time, each read in
    chunks into a fresh buffer and reduced before the next is read; the base is dropped before the last task's
    reduction and the combination, and read again to add ``λ·f``.  Bit-identical to the per-tensor form."""
    shape, like, wd = _layout(models, name)

    def taus():
        b = base.read(name).to(device=device, dtype=wd).reshape(-1)
        for i, m in enumerate(models):
            t = torch.empty(b.numel(), dtype=wd, device=device)
            m.read_flat_into(name, t)
            t.sub_(b)
            if i == len(models) - 1:
                del b
            yield t
            del t

    merged, lam = method.merged_from_tasks(name, taus(), weights, len(models), shape, **params)
    return _add_base(merged, lam, base, name, shape, like, device)


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder to ``out`` (replacing an existing one only after the new one is complete)."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, trash / "old")
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)


def read_checkpoint(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Load every tensor of a safetensors model folder (for tests and small models)."""
    ck = Checkpoint(path)
    try:
        return {n: ck.read(n) for n in ck.names()}
    finally:
        ck.close()


__all__ = ["merge_checkpoints", "validate", "Checkpoint", "ShardWriter", "MergeError", "ConfigError", "Terminated",
           "parse_size", "read_checkpoint", "plan_shards"]
