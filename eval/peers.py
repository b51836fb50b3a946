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
import contextlib
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peer_schemes import PEER_SPECS, PEERS, Layers, peer_stored_bytes

from compress.errors import UserError
from compress.models.base import ModelHandle

log = logging.getLogger("compress.peers")


# ----------------------------------------------------------------------------- running


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class _Setup:
    """What every peer row of one model shares: the loaded model, its calibration inputs, the
    evaluation seeds (and prompts or conditions), the teacher's samples, how to sample the
    student and how to score it."""

    handle: ModelHandle
    calib: Any
    teacher: Any
    eval_prompts: list[str] | None
    eval_seeds: list[int]
    gen_args: dict[str, Any]
    sample: Callable[[], Any]
    score: Callable[[Any, Any], dict[str, Any]]
    layers: Layers


def _pipeline_setup(model, cc, ev, device, cache) -> _Setup:
    from compress.metrics.evaluate import quality as quality_of
    from compress.metrics.evaluate import sample_images, teacher_images
    from compress.models import load_model
    from compress.passes.ptq import DEFAULT_INCLUDE
    from compress.runner import capture_calibration, family_defaults, resolve_prompts
    from compress.targets import select

    handle = load_model(model, device=device)
    if handle.pipeline is None:
        raise UserError(f"{model}: a transformer folder has no sampler; pass a pipeline "
                        "directory, demo or demo-dit")
    defaults = family_defaults(handle)
    calib = capture_calibration(handle, cc, defaults, cache, device)
    eval_prompts = resolve_prompts(ev.prompts, handle, "eval", ev.num_prompts)
    eval_seeds = [ev.seed + i for i in range(len(eval_prompts))]
    gen_args = {
        "steps": ev.steps or defaults["steps"],
        "guidance": ev.guidance if ev.guidance is not None else defaults["guidance"],
        "resolution": ev.resolution or defaults["resolution"],
    }
    teacher = teacher_images(handle, eval_prompts, eval_seeds, cache_dir=cache, **gen_args)
    demo = handle.source is not None and str(handle.source) == "demo"  # the checker applies
    return _Setup(
        handle, calib, teacher, eval_prompts, eval_seeds, gen_args,
        sample=lambda: sample_images(handle, eval_prompts, eval_seeds, **gen_args),
        score=lambda t, st: quality_of(t, st, eval_prompts, demo=demo),
        layers=select(handle.adapter, handle.transformer, list(DEFAULT_INCLUDE)),
    )


def _module_setup(module, calibrate_fn, sample_fn, metric_fn, ev) -> _Setup:
    """A user's own nn.Module as run_recipe sees it: prepared (torch attention unfused),
    calibrated by ``calibrate_fn``, its structure traced on the first captured call, sampled by
    ``sample_fn`` on the evaluation seeds and judged by ``metric_fn``."""
    from compress.calib.capture import capture_generic
    from compress.metrics.own import judge, own_samples
    from compress.models.generic import ADAPTER as GENERIC
    from compress.models.generic import analyse_module
    from compress.passes.ptq import DEFAULT_INCLUDE
    from compress.targets import select

    if calibrate_fn is None or sample_fn is None:
        raise UserError("a peer on your own module needs calibrate_fn and sample_fn")
    GENERIC.prepare(module)
    handle = ModelHandle(transformer=module, adapter=GENERIC, calibrate_fn=calibrate_fn,
                         sample_fn=sample_fn)
    calib = capture_generic(module, calibrate_fn)
    s0 = calib.sample(0)
    analyse_module(module, s0.args, s0.kwargs)
    eval_seeds = [ev.seed + i for i in range(ev.num_prompts)]
    teacher, conditions, kind = own_samples(sample_fn, module, eval_seeds)

    return _Setup(
        handle, calib, teacher, [str(c) for c in conditions] if conditions else None,
        eval_seeds, {}, sample=lambda: own_samples(sample_fn, module, eval_seeds)[0],
        score=lambda t, st: judge(t, st, kind, metric_fn, conditions),
        layers=select(GENERIC, module, list(DEFAULT_INCLUDE)),
    )


class PeerFailed(UserError):
    """The peer tool itself cannot quantise or run this model."""


@contextlib.contextmanager
def _peer_limit(name: str, what: str):
    """Errors raised inside the peer's own code become one clear PeerFailed."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise PeerFailed(f"peer {name} failed while {what} this model: {type(exc).__name__}: "
                         f"{first} (the peer tool, or this model under it, cannot do this)") from exc


def run_peer(
    name: str,
    model: str | Path | nn.Module,
    out_dir: str | Path,
    num_prompts: int,
    calib_prompts: int = 8,
    *,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    calibrate_fn: Callable[[nn.Module], None] | None = None,
    sample_fn: Callable[[nn.Module, list[int]], Any] | None = None,
    metric_fn: Callable[[Any, Any], float] | None = None,
) -> Path:
    """Apply peer scheme ``name`` to ``model``'s transformer, evaluate it like a recipe, and
    write a schema-1 report (report.json / .md / .html) into ``out_dir``.

    Args:
        name: one of ``PEERS``.
        model: "demo", a diffusers pipeline directory, "demo-dit" (the shipped ShapeDiT with
            its calibration, sampler and checker) or your own nn.Module (then pass
            ``calibrate_fn`` and ``sample_fn``, optionally ``metric_fn``, as to run_recipe;
            it is modified in place).
        out_dir: where the report goes (created; report files are replaced).
        num_prompts: evaluation prompts or seeds (the runner's: "auto" held-out prompts, or
            for a module seeds 1000 + i).
        calib_prompts: calibration prompts of a pipeline (the runner's default is 8); the
            inputs are captured for every peer because the latency step replays the first.
        device: torch device.
        cache_dir: root of the calibration and teacher caches (None: the runner's default).
        calibrate_fn, sample_fn, metric_fn: for an nn.Module, as ``compress.run_recipe``.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        UserError: unknown peer name, a transformer folder without a pipeline, a module
            without calibrate_fn / sample_fn.
    """
    from compress.metrics.timing import cpu_model, peak_rss_mb
    from compress.passes.ptq import DEFAULT_INCLUDE
    from compress.recipe import CalibrationConfig, EvalConfig
    from compress.report import write_report
    from compress.runner import buffer_elements, count_params, step_latency_ms, stored_bytes

    if name not in PEER_SPECS:
        raise UserError(f"unknown peer {name!r} (known: {', '.join(PEER_SPECS)})")
    peer = PEER_SPECS[name]
    cc = CalibrationConfig(num_prompts=calib_prompts)
    ev = EvalConfig(num_prompts=num_prompts)
    cache = Path(cache_dir) if cache_dir else None

    torch.manual_seed(0)  # the runner's default recipe seed
    if isinstance(model, (str, Path)) and str(model) == "demo-dit":
        from compress.demo import shapedit_task as task

        model = task.load_shapedit()
        calibrate_fn = calibrate_fn or task.calibrate
        sample_fn = sample_fn or task.sample_fn
        metric_fn = metric_fn or task.metric_fn
    if isinstance(model, nn.Module):
        tr = model
        orig_params, orig_bytes = count_params(tr), stored_bytes(tr)
        orig_elems = orig_params + buffer_elements(tr)  # the runner's bits/weight denominator
        st = _module_setup(model, calibrate_fn, sample_fn, metric_fn, ev)
    else:
        st = _pipeline_setup(model, cc, ev, device, cache)
        tr = st.handle.transformer
        orig_params, orig_bytes = count_params(tr), stored_bytes(tr)
        orig_elems = orig_params + buffer_elements(tr)
    handle = st.handle
    base_latency = step_latency_ms(handle, st.calib, ev.latency_repeats)

    layers = st.layers
    if not layers and not peer.whole_model:
        raise UserError(f"{model}: no Linear layer has a role in {DEFAULT_INCLUDE}")
    covered = (
        orig_params if peer.whole_model else sum(m.weight.numel() for _, m, _ in layers)
    )
    log.info("peer %s on %d layers", name, len(layers))
    t0 = time.perf_counter()
    with torch.no_grad(), _peer_limit(name, "quantising"):
        details = peer.apply(handle, layers, st.calib)
    secs = time.perf_counter() - t0
    tr = handle.transformer
    tr.eval()
    # before any forward: bitsandbytes repacks 4-bit weights for its CPU kernel on first use
    new_bytes = peer_stored_bytes(tr)
    nominal = details.pop("_nominal_quantised_bytes", None)
    simulated = bool(details.pop("_simulated_speed", False))
    if nominal is not None:  # fake quantisation: float weights held, the format's size counted
        new_bytes += nominal - sum(m.weight.numel() * m.weight.element_size()
                                   for _, m, _ in layers)

    with _peer_limit(name, "sampling"):
        student = st.sample()
    quality = st.score(st.teacher, student)
    latency = step_latency_ms(handle, st.calib, ev.latency_repeats)

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
        # quantising peers keep every weight (packed or cast), so the original count stays the
        # count; a pruning peer counts what is left
        "size": {"params_total": count_params(tr) if peer.prunes else orig_params,
                 "params_active": count_params(tr) if peer.prunes else orig_params,
                 "bytes": new_bytes, "bits_per_weight": new_bytes * 8 / orig_elems,
                 "compression_ratio": orig_bytes / max(new_bytes, 1)},
        "speed": {"latency_ms_per_step": latency, "baseline_latency_ms_per_step": base_latency,
                  "peak_rss_mb": peak_rss_mb(), "device": str(device), "cpu": cpu_model(),
                  **({"simulated": True} if simulated else {})},
        "quality": quality,
        "gates": {},
        "eval": {"prompts": st.eval_prompts, "seeds": st.eval_seeds, **st.gen_args},
    }
    out = Path(out_dir)
    latent = quality.get("samples") == "latents"
    write_report(out, report, None if latent else st.teacher, None if latent else student,
                 st.eval_prompts)
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
