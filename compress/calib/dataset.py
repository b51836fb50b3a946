"""The on-disk calibration set: what the transformer saw, written in shards and read lazily.

Layout of a set directory::

    index.json                 {"format", "complete", "meta", "shards", "samples"}
    shard-00000.safetensors    tensors only; keys "<sample>/<path>"
    shard-00001.safetensors    ...

Each entry of ``samples`` holds the args/kwargs structure of one transformer call as JSON, with
tensors replaced by ``{"__tensor__": [shard, key]}`` references. Tensors that do not change
between calls (text embeddings, masks, position ids) are stored once and referenced again.
"""

from __future__ import annotations

import json
import math
import shutil
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.errors import UserError

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
_SHARD_BYTES = 256 * 2**20


@dataclass
class CalibSample:
    """One recorded transformer call.

    ``timestep`` is the value as passed to the transformer (first element when batched; Flux
    passes t/1000), NaN when the call had no timestep. ``prompt_index`` is None for sets
    captured with a user callable.
    """

    args: tuple
    kwargs: dict[str, Any]
    step: int
    timestep: float
    prompt_index: int | None = None
    index: int = field(default=-1, compare=False)

    def to(self, device: str | torch.device) -> CalibSample:
        """A copy with every tensor moved to ``device``."""
        return CalibSample(
            args=_map_tensors(self.args, lambda t: t.to(device)),
            kwargs=_map_tensors(self.kwargs, lambda t: t.to(device)),
            step=self.step,
            timestep=self.timestep,
            prompt_index=self.prompt_index,
            index=self.index,
        )


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------- structure <-> JSON


def _encode(obj: Any, path: str, put: Any) -> Any:
    """JSON form of a call argument; ``put(tensor, path)`` stores a tensor, returns its ref."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": put(obj, path)}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        # JSON has no NaN/inf; keep them exact through a string form.
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(o, f"{path}.{i}", put) for i, o in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(o, f"{path}.{i}", put) for i, o in enumerate(obj)]
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"cannot record {path}: dict keys must be strings")
        # Dicts are always tagged so user keys can never collide with the tags above.
        return {"__dict__": {k: _encode(v, f"{path}.{k}", put) for k, v in obj.items()}}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"__device__": str(obj)}
    raise TypeError(
        f"cannot record transformer input {path} of type {type(obj).__name__}; "
        "only tensors, numbers, strings, None and lists/tuples/dicts of them are supported"
    )


def _decode(node: Any, get: Any) -> Any:
    if isinstance(node, list):
        return [_decode(n, get) for n in node]
    if not isinstance(node, dict):
        return node
    ((tag, value),) = node.items()
    if tag == "__tensor__":
        return get(tuple(value))
    if tag == "__tuple__":
        return tuple(_decode(n, get) for n in value)
    if tag == "__dict__":
        return {k: _decode(v, get) for k, v in value.items()}
    if tag == "__float__":
        return float(value)
    if tag == "__dtype__":
        return getattr(torch, value)
    if tag == "__device__":
        return torch.device(value)
    raise ValueError(f"unknown tag {tag!r} in calibration index")


def _timestep_of(kwargs: dict[str, Any]) -> float:
    for name in ("timestep", "timesteps", "t"):
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            return float(t.reshape(-1)[0])
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            return float(t)
    return math.nan


# ---------------------------------------------------------------- writer


class CalibrationWriter:
    """Appends recorded calls to a set directory; ``close(meta)`` writes index.json last.

    Tensors are copied to CPU at ``add`` time (the pipeline may reuse its buffers) and flushed
    to a new shard whenever ~256 MiB are pending, so capture memory stays bounded.
    """

    def __init__(self, root: str | Path, shard_bytes: int = _SHARD_BYTES) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.shards: list[str] = []
        self.samples: list[dict[str, Any]] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        # Last tensor stored at each argument path: an unchanged tensor is referenced again
        # instead of stored again (text embeddings repeat at every denoising step).
        self._last: dict[str, tuple[torch.Tensor, list[str]]] = {}

    def _shard_name(self) -> str:
        return f"shard-{len(self.shards):05d}.safetensors"

    def add(
        self,
        args: tuple,
        kwargs: dict[str, Any],
        step: int,
        timestep: float | None = None,
        prompt_index: int | None = None,
    ) -> None:
        """Record one call's inputs."""
        i = len(self.samples)

        def put(t: torch.Tensor, path: str) -> list[str]:
            cpu = t.detach().to("cpu", copy=True).contiguous()
            prev = self._last.get(path)
            if (
                prev is not None
                and prev[0].dtype == cpu.dtype
                and prev[0].shape == cpu.shape
                and torch.equal(prev[0], cpu)
            ):
                return prev[1]
            key = f"{i}/{path}"
            ref = [self._shard_name(), key]
            self._pending[key] = cpu
            self._pending_bytes += cpu.numel() * cpu.element_size()
            self._last[path] = (cpu, ref)
            return ref

        ts = _timestep_of(kwargs) if timestep is None else float(timestep)
        self.samples.append(
            {
                "args": _encode(tuple(args), "args", put),
                "kwargs": _encode(dict(kwargs), "kwargs", put),
                "step": int(step),
                "timestep": ts if math.isfinite(ts) else None,
                "prompt_index": prompt_index,
            }
        )
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write pending tensors to the current shard and start a new one."""
        if not self._pending:
            return
        save_file(self._pending, str(self.root / self._shard_name()), metadata={"format": "pt"})
        self.shards.append(self._shard_name())
        self._pending = {}
        self._pending_bytes = 0

    def close(self, meta: dict[str, Any]) -> None:
        """Flush and write index.json; the set is complete only after this returns."""
        self.flush()
        self._last.clear()
        index = {
            "format": FORMAT_VERSION,
            "complete": True,
            "meta": {**meta, "num_samples": len(self.samples)},
            "shards": self.shards,
            "samples": self.samples,
        }
        tmp = self.root / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True))
        tmp.replace(self.root / INDEX_NAME)


def is_complete(root: str | Path) -> bool:
    """True when ``root`` holds a fully written calibration set."""
    root = Path(root)
    try:
        index = json.loads((root / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (
        index.get("format") == FORMAT_VERSION
        and index.get("complete") is True
        and all((root / s).is_file() for s in index.get("shards", []))
    )


# ---------------------------------------------------------------- reader


class _StopForward(Exception):
    """Raised by the block pre-hook so the transformer stops once the block inputs are known."""


class _TempDir:
    """Owns a temporary set directory; removed when no set view refers to it any more."""

    def __init__(self, path: Path) -> None:
        self.path = path
        weakref.finalize(self, shutil.rmtree, str(path), True)


class CalibrationSet:
    """A calibration set on disk, read one sample at a time.

    Attributes:
        root: the set directory.
        meta: what was captured (hash, family, prompts, seeds, steps, guidance, resolution ...).
    """

    def __init__(
        self,
        root: str | Path,
        _indices: list[int] | None = None,
        _owner: _TempDir | None = None,
        _index: dict[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        if _index is None:
            if not is_complete(self.root):
                raise UserError(
                    f"no complete calibration set at {self.root}; run the calibration again"
                )
            _index = json.loads((self.root / INDEX_NAME).read_text())
        self._index = _index
        self.meta: dict[str, Any] = _index["meta"]
        self._records: list[dict[str, Any]] = _index["samples"]
        self._indices = list(range(len(self._records))) if _indices is None else list(_indices)
        self._owner = _owner

    def __len__(self) -> int:
        return len(self._indices)

    def __iter__(self) -> Iterator[CalibSample]:
        for i in range(len(self)):
            yield self.sample(i)

    def __repr__(self) -> str:
        return f"CalibrationSet({str(self.root)!r}, samples={len(self)})"

    def _record(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for a set of {len(self)}")
        return self._records[self._indices[i]]

    def sample(self, i: int) -> CalibSample:
        """Load sample ``i`` from disk (CPU tensors)."""
        rec = self._record(i)
        handles: dict[str, Any] = {}
        loaded: dict[tuple[str, str], torch.Tensor] = {}

        def get(ref: tuple[str, str]) -> torch.Tensor:
            # A repeated reference within one sample yields the same tensor object, as the
            # pipeline passed it.
            if ref not in loaded:
                shard, key = ref
                if shard not in handles:
                    handles[shard] = safe_open(str(self.root / shard), framework="pt")
                loaded[ref] = handles[shard].get_tensor(key)
            return loaded[ref]

        args = _decode(rec["args"], get)
        kwargs = _decode(rec["kwargs"], get)
        ts = rec.get("timestep")
        return CalibSample(
            args=tuple(args),
            kwargs=dict(kwargs),
            step=int(rec["step"]),
            timestep=math.nan if ts is None else float(ts),
            prompt_index=rec.get("prompt_index"),
            index=self._indices[i],
        )

    def timesteps(self) -> list[float]:
        """The timestep of every sample (NaN where the call had none), without loading tensors."""
        out = []
        for i in range(len(self)):
            ts = self._record(i).get("timestep")
            out.append(math.nan if ts is None else float(ts))
        return out

    def steps(self) -> list[int]:
        """The denoising step index of every sample (call index for user-callable sets)."""
        return [int(self._record(i)["step"]) for i in range(len(self))]

    def prompt_indices(self) -> list[int | None]:
        """Which prompt each sample came from (None for user-callable sets)."""
        return [self._record(i).get("prompt_index") for i in range(len(self))]

    def subset(
        self, max_samples: int | None = None, steps: int | Iterable[int] | None = None
    ) -> CalibrationSet:
        """A view on fewer samples; nothing is copied.

        Args:
            max_samples: keep at most this many, spread evenly over the set so that every
                prompt and timestep range stays represented.
            steps: keep only samples of these denoising step indices.
        """
        idx = list(self._indices)
        if steps is not None:
            wanted = {steps} if isinstance(steps, int) else set(steps)
            idx = [j for j in idx if int(self._records[j]["step"]) in wanted]
        if max_samples is not None:
            if max_samples < 0:
                raise ValueError(f"max_samples must be >= 0, got {max_samples}")
            n = len(idx)
            if max_samples < n:
                idx = [idx[(k * n) // max_samples] for k in range(max_samples)]
        return CalibrationSet(self.root, _indices=idx, _owner=self._owner, _index=self._index)

    def block_inputs(
        self,
        transformer: nn.Module,
        adapter: Any,
        block_name: str,
        device: str | torch.device = "cpu",
    ) -> Iterator[tuple[tuple, dict[str, Any]]]:
        """Per sample, the (args, kwargs) that block ``block_name`` receives now.

        The current ``transformer`` (possibly already partly compressed) runs on each sample
        until it reaches the block, then stops, so only one sample's activations are alive.

        Args:
            transformer: the transformer to run.
            adapter: its family adapter (``blocks`` for names, ``call`` to run it).
            block_name: e.g. ``"transformer_blocks.3"``, as listed by ``adapter.blocks``; any
                submodule name of the transformer is accepted too.
            device: where the sample's tensors go before the run.
        """
        block = find_block(transformer, adapter, block_name)
        for i in range(len(self)):
            s = self.sample(i).to(device)
            yield inputs_to_block(transformer, adapter, block, s.args, s.kwargs, block_name)


def find_block(transformer: nn.Module, adapter: Any, block_name: str) -> nn.Module:
    """The module called ``block_name``: a block of ``adapter.blocks`` or any submodule."""
    blocks = dict(adapter.blocks(transformer))
    if block_name in blocks:
        return blocks[block_name]
    try:
        return transformer.get_submodule(block_name)
    except AttributeError:
        names = list(blocks)
        shown = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
        raise ValueError(f"no block {block_name!r} in the transformer (blocks: {shown})") from None


def inputs_to_block(
    transformer: nn.Module, adapter: Any, block: nn.Module, args: tuple, kwargs: dict[str, Any],
    name: str = "the requested block",
) -> tuple[tuple, dict[str, Any]]:
    """Run ``transformer`` on one input until ``block`` is called; return the block's inputs."""
    seen: list[tuple[tuple, dict[str, Any]]] = []

    def hook(_mod: nn.Module, b_args: tuple, b_kwargs: dict[str, Any]) -> None:
        seen.append((tuple(b_args), dict(b_kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.call(transformer, args, kwargs)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        from compress.errors import UserError

        raise UserError(f"block {name!r} is not called when the model runs on a calibration "
                        "sample (iterated or skipped, not called), so it cannot be calibrated "
                        "block by block; name the blocks that are called with the recipe key "
                        "model.blocks or compress.ModelSpec(blocks=...) (compress.inspect shows "
                        "what was found)")
    return seen[0]


def replay(handle: Any, samples: CalibrationSet, model: nn.Module | None = None) -> None:
    """Run every sample of ``samples`` through ``model`` (default: the handle's transformer)
    on the handle's device, without gradients (what hooks that record activations need)."""
    dev = handle.run.get("device", "cpu")
    tr = handle.transformer if model is None else model
    with torch.no_grad():
        for i in range(len(samples)):
            s = samples.sample(i).to(dev)
            handle.adapter.call(tr, s.args, s.kwargs)
