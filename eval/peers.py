"""Peer tools as comparison rows: apply optimum-quanto, bitsandbytes or a plain bf16 cast to a
model's transformer and write the same schema-1 report our recipes get, so `eval/quality.py`
can put them in one table.

    python eval/peers.py quanto-w8a8,bnb-nf4 --model demo --work runs/quality  # -> peer-<name>/

Every peer sees what a recipe run with default settings sees: the runner's calibration inputs
(8 "auto" prompts, seeds 0.., family default steps / guidance / resolution, cached), the
runner's evaluation prompts and seeds ("auto" held-out prompts, seeds 1000 + i), the same
cached teacher images, and the same latency measurement (one transformer call on the first
calibration sample, median of 5). Rows are therefore directly comparable with recipe rows.

Scope: quanto and bitsandbytes are applied to the layers our ``ptq`` pass targets by default
(roles attn_qkv, attn_out, cross_attn, ff_in, ff_out, chosen with ``compress.targets.select``).
Both tools would happily quantize every Linear of the transformer (quanto's ``quantize`` on
the whole model, bitsandbytes through diffusers' ``BitsAndBytesConfig``), including the
embedders, adaLN and the output projection; we restrict them so that a row differs from ours
only in how those layers are stored. ``bf16`` casts the same layers; ``bf16-full`` is the one
whole-model peer, the cast users do with ``pipe.transformer.to(torch.bfloat16)``.

Size is what each tool stores: quanto's tensor subclasses are counted by their inner tensors
(int8 / packed uint8 data, scales, shifts), bitsandbytes layers by their state dict (packed
weight plus every quant-state tensor it serializes), and the activation scales quanto keeps
per layer; bits per weight divide by the original parameter count.

Notes per tool (CPU, this environment):
    * quanto qint4 / qint2 weights are unpacked by a C++ extension that quanto compiles on
      first use (a few minutes, cached in its package directory); a machine without a C++
      compiler cannot run those two peers.
    * quanto's static activation scales follow its ``Calibration`` (absmax with momentum 0.9
      over the calibration calls); ``streamline=False`` keeps output quantization on every
      layer, because with streamlining the reloaded model's outputs differ from the calibrated
      one's.
    * bitsandbytes layers are swapped in by hand: diffusers' ``BitsAndBytesConfig`` refuses to
      load without a GPU although the layers run on CPU. Linear8bitLt casts its inputs to
      fp16 and quantizes them per token (dynamic), so bnb-int8 is a W8A8 scheme. Its 4-bit
      CPU kernel (used where AVX512-bf16 exists) needs whole blocks per row: layers narrower
      than bnb's default block of 64 use blocks of 32.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compress.errors import UserError
from compress.models.base import ModelHandle
from compress.modules.swap import set_submodule

log = logging.getLogger("compress.peers")

Layers = list[tuple[str, nn.Module, str]]
# apply(handle, layers, calib) -> pass-specific report fields
ApplyFn = Callable[[ModelHandle, Layers, Any], dict[str, Any]]


@dataclass(frozen=True)
class _Peer:
    description: str
    apply: ApplyFn
    tool: str  # distribution name, for its version in the report
    settings: dict[str, Any]
    whole_model: bool = False


# ----------------------------------------------------------------------------- stored bytes


def _tensor_bytes(t: torch.Tensor, seen: set[int]) -> int:
    """Bytes ``t`` really holds: inner tensors of wrapper subclasses, shared storage once."""
    if hasattr(type(t), "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n), seen) for n in names)
    if t.numel() == 0:
        return 0
    ptr = t.data_ptr()
    if ptr in seen:
        return 0
    seen.add(ptr)
    return t.numel() * t.element_size()


def peer_stored_bytes(module: nn.Module) -> int:
    """The transformer's stored bytes, counting quantized tensor subclasses by what they hold.

    Walks the state dict (what a save writes): quanto's QTensors are flattened recursively
    into their data / scale / shift tensors, bitsandbytes layers contribute their packed
    weight and the quant-state tensors their ``_save_to_state_dict`` emits.
    """
    seen: set[int] = set()
    return sum(_tensor_bytes(t, seen) for t in module.state_dict().values())


# ----------------------------------------------------------------------------- the peers


def _calib_calls(handle: ModelHandle, calib: Any) -> int:
    n = 0
    with torch.inference_mode():
        for i in range(len(calib)):
            s = calib.sample(i)
            handle.adapter.call(handle.transformer, s.args, s.kwargs)
            n += 1
    return n


def _quanto(weights: str, activations: str | None) -> ApplyFn:
    def apply(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
        from optimum.quanto import Calibration, QModuleMixin, freeze, qtypes, quantize

        tr = handle.transformer
        names = [n for n, _, _ in layers]
        # quanto matches fnmatch patterns; escaped exact names select exactly our layers
        quantize(
            tr,
            weights=qtypes[weights],
            activations=None if activations is None else qtypes[activations],
            include=[glob.escape(n) for n in names],
        )
        out: dict[str, Any] = {}
        if activations is not None:
            if calib is None or len(calib) == 0:
                raise UserError("quanto activation calibration needs captured inputs")
            with Calibration(streamline=False):
                out["calibration_calls"] = _calib_calls(handle, calib)
        freeze(tr)
        swapped = [n for n, m in tr.named_modules() if isinstance(m, QModuleMixin)]
        if sorted(swapped) != sorted(names):
            raise RuntimeError(f"quanto quantized {len(swapped)} layers, expected {len(names)}")
        groups = {
            getattr(m, "weight_group_size", None)
            for m in tr.modules()
            if isinstance(m, QModuleMixin)
        }
        out["weight_group_sizes"] = sorted(("channel" if g is None else g) for g in groups)
        return out

    return apply


def _bnb_nf4(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
    import bitsandbytes as bnb

    tr = handle.transformer
    sizes: set[int] = set()
    for name, mod, _ in layers:
        w = mod.weight
        # bnb's default block of 64; its CPU kernel needs whole blocks per row, so a layer
        # narrower than that (tiny test models) takes bnb's smallest block, 32
        block = next((b for b in (64, 32) if mod.in_features % b == 0), 64)
        sizes.add(block)
        q = bnb.nn.Linear4bit(
            mod.in_features, mod.out_features, bias=mod.bias is not None,
            compute_dtype=w.dtype, quant_type="nf4", device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            w.detach().clone(), requires_grad=False, blocksize=block, quant_type="nf4",
            module=q,
        )
        if mod.bias is not None:
            q.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        # Params4bit quantizes when moved to a real device (CPU included)
        set_submodule(tr, name, q.to(w.device))
    return {"blocksizes": sorted(sizes), "double_quant": True}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_INT8_CAST = "MatMul8bitLt: inputs will be cast"


def _bnb_int8(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
    import bitsandbytes as bnb

    # bnb logs this on every matmul of a non-fp16 input; the report says it once instead
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropMessage) for f in bnb_log.filters):
        bnb_log.addFilter(_DropMessage(_INT8_CAST))
    tr = handle.transformer
    threshold = None
    for name, mod, _ in layers:
        w = mod.weight
        q = bnb.nn.Linear8bitLt(
            mod.in_features, mod.out_features, bias=mod.bias is not None,
            has_fp16_weights=False, device="meta",
        )
        q.weight = bnb.nn.Int8Params(w.detach().clone(), requires_grad=False,
                                     has_fp16_weights=False)
        if mod.bias is not None:
            q.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        q = q.to(w.device)  # Int8Params quantizes (per-row absmax) when moved to a device
        threshold = q.state.threshold
        set_submodule(tr, name, q)
    return {"threshold": threshold,
            "activations": "cast to float16, then int8 per token (dynamic absmax)"}


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floats(o, dtype) for o in obj]
    if type(obj) is dict:  # a copy: the caller's dicts (added_cond_kwargs) stay as they were
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, dict):
        for k in list(obj.keys()):  # in place: keeps diffusers' output classes intact
            obj[k] = _cast_floats(obj[k], dtype)
        return obj
    return obj


def _run_in_bf16(module: nn.Module) -> str:
    """Cast ``module`` to bf16; its floating inputs are cast to bf16, its outputs back."""
    outer = next(iter(module.parameters())).dtype
    module.to(torch.bfloat16)

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _cast_floats(args, torch.bfloat16), _cast_floats(kwargs, torch.bfloat16)

    def post(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        return _cast_floats(output, outer)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)
    return str(outer).replace("torch.", "")


def _bf16_layers(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
    outer = {_run_in_bf16(mod) for _, mod, _ in layers}
    return {"io_dtype": sorted(outer)}


def _bf16_full(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
    # The pipeline keeps latents and text embeddings in its own dtype: cast at the boundary.
    return {"io_dtype": [_run_in_bf16(handle.transformer)]}


PEER_SPECS: dict[str, _Peer] = {
    "quanto-w8a8": _Peer(
        "optimum-quanto qint8 weights (per output channel) + qint8 static activations, "
        "calibrated with Calibration(streamline=False) on the captured inputs, then frozen",
        _quanto("qint8", "qint8"), "optimum-quanto",
        {"weights": "qint8", "activations": "qint8", "streamline": False},
    ),
    "quanto-w4a8": _Peer(
        "optimum-quanto qint4 weights (groups of up to 128 inputs) + qint8 static activations, "
        "calibrated with Calibration(streamline=False), then frozen",
        _quanto("qint4", "qint8"), "optimum-quanto",
        {"weights": "qint4", "activations": "qint8", "streamline": False},
    ),
    "quanto-w4": _Peer(
        "optimum-quanto qint4 weights (groups of up to 128 inputs), float activations, frozen",
        _quanto("qint4", None), "optimum-quanto", {"weights": "qint4", "activations": None},
    ),
    "quanto-w2": _Peer(
        "optimum-quanto qint2 weights (groups of up to 128 inputs), float activations, frozen",
        _quanto("qint2", None), "optimum-quanto", {"weights": "qint2", "activations": None},
    ),
    "bnb-nf4": _Peer(
        "bitsandbytes Linear4bit nf4 (blocks of 64, double-quantized absmax), swapped in by "
        "hand, computing in the model's dtype",
        _bnb_nf4, "bitsandbytes", {"quant_type": "nf4", "blocksize": 64, "double_quant": True},
    ),
    "bnb-int8": _Peer(
        "bitsandbytes Linear8bitLt: int8 weights per output row, activations cast to fp16 and "
        "quantized to int8 per token, int8 matmul; threshold at the class default (0: no "
        "outlier split), swapped in by hand",
        _bnb_int8, "bitsandbytes", {"has_fp16_weights": False, "threshold": "class default"},
    ),
    "bf16": _Peer(
        "the targeted layers' weights cast to bfloat16 (their inputs cast to bf16, outputs "
        "back), everything else unchanged",
        _bf16_layers, "torch", {"dtype": "bfloat16"},
    ),
    "bf16-full": _Peer(
        "the whole transformer cast to bfloat16 (pipe.transformer.to(torch.bfloat16)); its "
        "inputs cast to bf16, its output back",
        _bf16_full, "torch", {"dtype": "bfloat16"}, whole_model=True,
    ),
}

PEERS: dict[str, str] = {name: spec.description for name, spec in PEER_SPECS.items()}


# ----------------------------------------------------------------------------- running


def _is_demo(handle: ModelHandle) -> bool:
    return handle.source is not None and str(handle.source) == "demo"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run_peer(
    name: str,
    model: str | Path,
    out_dir: str | Path,
    num_prompts: int,
    calib_prompts: int = 8,
    *,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
) -> Path:
    """Apply peer scheme ``name`` to ``model``'s transformer, evaluate it like a recipe, and
    write a schema-1 report (report.json / .md / .html) into ``out_dir``.

    Args:
        name: one of ``PEERS``.
        model: "demo" or a diffusers pipeline directory.
        out_dir: where the report goes (created; report files are replaced).
        num_prompts: evaluation prompts (the runner's "auto" eval prompts, seeds 1000 + i).
        calib_prompts: calibration prompts (the runner's default is 8); the inputs are
            captured for every peer because the latency step replays the first of them.
        device: torch device.
        cache_dir: root of the calibration and teacher caches (None: the runner's default).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        UserError: unknown peer name or a model without a pipeline.
    """
    from compress.calib.capture import capture
    from compress.metrics.evaluate import quality as quality_of
    from compress.metrics.evaluate import sample_images, teacher_images
    from compress.metrics.timing import peak_rss_mb
    from compress.models import load_model
    from compress.passes.ptq import DEFAULT_INCLUDE
    from compress.recipe import CalibrationConfig, EvalConfig
    from compress.report import write_report
    from compress.runner import (
        buffer_elements,
        count_params,
        family_defaults,
        resolve_prompts,
        step_latency_ms,
        stored_bytes,
    )
    from compress.targets import select

    if name not in PEER_SPECS:
        raise UserError(f"unknown peer {name!r} (known: {', '.join(PEER_SPECS)})")
    peer = PEER_SPECS[name]
    cc = CalibrationConfig(num_prompts=calib_prompts)
    ev = EvalConfig(num_prompts=num_prompts)

    handle = load_model(model, device=device)
    if handle.pipeline is None:
        raise UserError(f"{model}: peers are evaluated on images; pass a pipeline directory")
    torch.manual_seed(0)  # the runner's default recipe seed
    tr = handle.transformer
    orig_params = count_params(tr)
    orig_elems = orig_params + buffer_elements(tr)  # the runner's denominator for bits/weight
    orig_bytes = stored_bytes(tr)
    defaults = family_defaults(handle)
    cache = Path(cache_dir) if cache_dir else None

    prompts = resolve_prompts(cc.prompts, handle, "calibration", cc.num_prompts)
    calib = capture(
        handle, prompts,
        seeds=[cc.seed + i for i in range(len(prompts))],
        steps=cc.steps or defaults["steps"],
        guidance=cc.guidance if cc.guidance is not None else defaults["guidance"],
        resolution=cc.resolution or defaults["resolution"],
        capture_steps=cc.capture_steps, cache_dir=cache, device=device,
    )
    eval_prompts = resolve_prompts(ev.prompts, handle, "eval", ev.num_prompts)
    eval_seeds = [ev.seed + i for i in range(len(eval_prompts))]
    gen_args = {
        "steps": ev.steps or defaults["steps"],
        "guidance": ev.guidance if ev.guidance is not None else defaults["guidance"],
        "resolution": ev.resolution or defaults["resolution"],
    }
    teacher = teacher_images(handle, eval_prompts, eval_seeds, cache_dir=cache, **gen_args)
    base_latency = step_latency_ms(handle, calib, ev.latency_repeats)

    layers = select(handle.adapter, tr, list(DEFAULT_INCLUDE))
    if not layers and not peer.whole_model:
        raise UserError(f"{model}: no Linear layer has a role in {DEFAULT_INCLUDE}")
    covered = (
        orig_params if peer.whole_model else sum(m.weight.numel() for _, m, _ in layers)
    )
    log.info("peer %s on %d layers", name, len(layers))
    t0 = time.perf_counter()
    with torch.no_grad():
        details = peer.apply(handle, layers, calib)
    secs = time.perf_counter() - t0
    tr = handle.transformer
    tr.eval()
    # before any forward: bitsandbytes repacks 4-bit weights for its CPU kernel on first use
    new_bytes = peer_stored_bytes(tr)

    student = sample_images(handle, eval_prompts, eval_seeds, **gen_args)
    quality = quality_of(teacher, student, eval_prompts, demo=_is_demo(handle))
    latency = step_latency_ms(handle, calib, ev.latency_repeats)

    recipe = {
        "name": f"peer:{name}",
        "description": peer.description,
        "peer": {
            "tool": peer.tool,
            "version": _version(peer.tool),
            **peer.settings,
            "layers": "whole transformer" if peer.whole_model else list(DEFAULT_INCLUDE),
        },
        "calibration": cc.model_dump(mode="json"),
        "eval": ev.model_dump(mode="json"),
        "seed": 0,
    }
    blob = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    report: dict[str, Any] = {
        "schema": 1,
        "recipe": recipe,
        "recipe_hash": hashlib.sha256(blob.encode()).hexdigest()[:16],
        "model": {"path": str(handle.source) if handle.source else None,
                  "family": handle.family, "params": orig_params,
                  "buffer_elements": orig_elems - orig_params,
                  "class": type(tr).__name__, "original_bytes": orig_bytes},
        "passes": [{
            "name": f"peer:{name}", "seconds": round(secs, 3),
            "layers_quantized": len(layers) if not peer.whole_model else None,
            "weights_quantized_fraction": covered / orig_params,
            **details,
        }],
        # peers keep every weight (packed or cast), so the original count stays the count
        "size": {"params_total": orig_params, "params_active": orig_params,
                 "bytes": new_bytes, "bits_per_weight": new_bytes * 8 / orig_elems,
                 "compression_ratio": orig_bytes / max(new_bytes, 1)},
        "speed": {"latency_ms_per_step": latency, "baseline_latency_ms_per_step": base_latency,
                  "peak_rss_mb": peak_rss_mb(), "device": str(device)},
        "quality": quality,
        "gates": {},
        "eval": {"prompts": eval_prompts, "seeds": eval_seeds, **gen_args},
    }
    out = Path(out_dir)
    write_report(out, report, teacher, student, eval_prompts)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peers", help=f"comma list of peers: {', '.join(PEERS)}")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--work", type=Path, default=Path("runs/quality"), help="outputs go here")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--calib-prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from compress.report import summary_lines

    for name in [p.strip() for p in a.peers.split(",") if p.strip()]:
        out = run_peer(name, a.model, a.work / f"peer-{name}", a.num_prompts, a.calib_prompts)
        report = json.loads((out / "report.json").read_text())
        print(f"== peer {name} -> {out}")
        print("\n".join(summary_lines(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
