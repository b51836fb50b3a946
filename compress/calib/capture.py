"""Record what the transformer sees while the real pipeline runs, and cache it on disk by hash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.calib.dataset import (
    FORMAT_VERSION,
    CalibrationSet,
    CalibrationWriter,
    _TempDir,
    is_complete,
)
from compress.errors import UserError

log = logging.getLogger(__name__)

# Calibration seeds start here so they never coincide with evaluation seeds (0, 1, 2 ...):
# a recipe tuned on the very noise it is scored on would look better than it is.
SEED_BASE = 1_000_000


def default_cache_root() -> Path:
    """Where calibration sets are cached: ``$DIT_COMPRESS_CACHE/calib``, else
    ``~/.cache/dit-compress/calib``."""
    base = os.environ.get("DIT_COMPRESS_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "dit-compress"
    return root / "calib"


def state_hash(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict(keep_vars=False).items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # uint8 view: numpy has no bfloat16, and the raw bytes are what identifies the weights.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def calibration_hash(
    model_hash: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float | None,
    resolution: int | None,
    capture_steps: Sequence[int] | None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The cache key of a pipeline capture."""
    payload = {
        "format": FORMAT_VERSION,
        "model": model_hash,
        "prompts": list(prompts),
        "seeds": [int(s) for s in seeds],
        "steps": int(steps),
        "guidance": guidance,
        "resolution": resolution,
        "capture_steps": None if capture_steps is None else [int(s) for s in capture_steps],
        **(extra or {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class _Recorder:
    """Forward pre-hook on the transformer writing each call's inputs to a CalibrationWriter.

    The denoising step index comes from counting ``scheduler.step`` calls, which works for
    every diffusers pipeline whatever it passes as timestep and however it batches CFG (two
    transformer calls in one step share the index). Without a scheduler the step index is
    the call index.
    """

    def __init__(self, writer: CalibrationWriter, keep_steps: set[int] | None = None) -> None:
        self.writer = writer
        self.keep_steps = keep_steps
        self.prompt_index: int | None = None
        self.scheduler_steps: int | None = None
        self.calls = 0

    def hook(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        step = self.calls if self.scheduler_steps is None else self.scheduler_steps
        self.calls += 1
        if self.keep_steps is None or step in self.keep_steps:
            self.writer.add(args, kwargs, step=step, prompt_index=self.prompt_index)

    @contextmanager
    def attached(self, module: nn.Module, scheduler: Any = None) -> Iterator[_Recorder]:
        handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)
        had_own = scheduler is not None and "step" in vars(scheduler)
        if scheduler is not None:
            original = scheduler.step

            def counted_step(*a: Any, **k: Any) -> Any:
                try:
                    return original(*a, **k)
                finally:
                    self.scheduler_steps = (self.scheduler_steps or 0) + 1

            scheduler.step = counted_step
        try:
            yield self
        finally:
            handle.remove()
            if scheduler is not None:
                if had_own:
                    scheduler.step = original
                else:
                    del scheduler.step

    def start_prompt(self, index: int, counts_steps: bool) -> None:
        self.prompt_index = index
        self.scheduler_steps = 0 if counts_steps else None
        self.calls = 0


def _publish(tmp: Path, root: Path) -> None:
    """Move a finished temp set into place; a set another process finished first wins."""
    if root.exists():
        if is_complete(root):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        stale = root.with_name(f"{root.name}.stale-{uuid.uuid4().hex[:8]}")
        os.rename(root, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:
        if not is_complete(root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _normalize_capture_steps(capture_steps: Sequence[int] | None, steps: int) -> list[int] | None:
    if capture_steps is None:
        return None
    out = set()
    for s in capture_steps:
        s = int(s)
        resolved = s + steps if s < 0 else s
        if not 0 <= resolved < steps:
            raise UserError(
                f"capture step {s} is outside 0..{steps - 1} for {steps} denoising steps; "
                "pick step indices below the step count"
            )
        out.add(resolved)
    if not out:
        raise UserError("capture_steps is empty; give at least one step index or leave it unset")
    return sorted(out)


def _model_hash(handle: Any) -> str:
    if handle.source_hash:
        return str(handle.source_hash)
    log.info("hashing transformer weights for the calibration cache key")
    return state_hash(handle.transformer)


def _transformer_dtype(module: nn.Module) -> str:
    p = next(iter(module.parameters()), None)
    return str(p.dtype) if p is not None else "none"


def capture(
    handle: Any,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] | None = None,
    steps: int = 10,
    guidance: float | None = None,
    resolution: int | None = None,
    capture_steps: Sequence[int] | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device | None = "cpu",
    progress: bool = True,
    model_key: str | None = None,
    cached_only: bool = False,
) -> CalibrationSet | None:
    """Run the pipeline on ``prompts`` and record every transformer call.

    The pipeline runs once per prompt through ``handle.adapter.generate``; prompt ``i`` is
    seeded with ``seeds[i]``. The result is cached under ``cache_dir`` by a hash of the model,
    prompts, seeds, steps, guidance, resolution and capture_steps, so a second call with the
    same inputs returns the stored set without running anything.

    Args:
        handle: a ModelHandle with a pipeline (a handle without one but with a
            ``calibrate_fn`` is captured with :func:`capture_generic`, uncached).
        prompts: the calibration prompts.
        seeds: one seed per prompt; default ``SEED_BASE + i``.
        steps: denoising steps per image.
        guidance: guidance scale, None for the family's default.
        resolution: image side in pixels, None for the family's default.
        capture_steps: keep only these denoising step indices (negative counts from the end).
        cache_dir: root of the calibration cache; default :func:`default_cache_root`.
        device: where the pipeline runs (moved there if elsewhere); None leaves it as is.
            Recorded tensors are stored on CPU.
        progress: show a progress bar over prompts.
        model_key: names the transformer in the cache key instead of the source checkpoint's
            hash (a model changed since it was loaded, e.g. a student mid-training).
        cached_only: return the set only if it is in the cache (None otherwise, nothing run).

    Returns:
        The calibration set, stored at ``<cache_dir>/<hash>``.

    Raises:
        UserError: no prompts, seeds of the wrong length, bad capture_steps, or a handle
            that can neither generate nor calibrate.
    """
    if handle.pipeline is None:
        if handle.calibrate_fn is not None:
            return capture_generic(handle.transformer, handle.calibrate_fn, cache_dir=cache_dir)
        raise UserError(
            "the model has no pipeline to calibrate with; pass a calibrate_fn that runs it"
        )
    generate = handle.adapter.generate
    if generate is None:
        raise UserError(f"family {handle.adapter.name!r} cannot generate images for calibration")
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise UserError("no calibration prompts given; pass a prompt file with at least one line")
    if seeds is None:
        seeds = [SEED_BASE + i for i in range(len(prompts))]
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise UserError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    # 4 and 4.0 must give the same cache key.
    guidance = None if guidance is None else float(guidance)
    resolution = None if resolution is None else int(resolution)
    kept = _normalize_capture_steps(capture_steps, steps)

    transformer = handle.transformer
    key = calibration_hash(
        model_key or _model_hash(handle),
        prompts,
        seeds,
        steps,
        guidance,
        resolution,
        kept,
        extra={"family": handle.family, "dtype": _transformer_dtype(transformer)},
    )
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    root = cache_root / key[:32]
    if is_complete(root):
        log.info("calibration cache hit: %s", root)
        return CalibrationSet(root)
    if cached_only:
        return None

    if device is not None:
        p = next(iter(transformer.parameters()), None)
        # Meta parameters mean accelerate offloading manages placement; leave it alone.
        if p is not None and p.device.type != "meta" and p.device != torch.device(device):
            handle.pipeline.to(device)

    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:12]}-", dir=cache_root))
    try:
        writer = CalibrationWriter(tmp)
        recorder = _Recorder(writer, None if kept is None else set(kept))
        scheduler = getattr(handle.pipeline, "scheduler", None)
        with recorder.attached(transformer, scheduler):
            bar = tqdm(
                list(enumerate(zip(prompts, seeds))),
                desc="calibration",
                unit="prompt",
                disable=not progress,
            )
            for i, (prompt, seed) in bar:
                recorder.start_prompt(i, counts_steps=scheduler is not None)
                with torch.no_grad():
                    generate(handle.pipeline, [prompt], [seed], steps, guidance, resolution)
                # A shard per prompt keeps capture memory at one prompt's worth.
                writer.flush()
        if not writer.samples:
            raise RuntimeError("the pipeline never called the transformer during calibration")
        writer.close(
            {
                "kind": "pipeline",
                "hash": key,
                "family": handle.family,
                "source": None if handle.source is None else str(handle.source),
                "source_hash": handle.source_hash,
                "transformer_class": type(transformer).__name__,
                "dtype": _transformer_dtype(transformer),
                "prompts": prompts,
                "seeds": seeds,
                "steps": steps,
                "guidance": guidance,
                "resolution": resolution,
                "capture_steps": kept,
                "torch": torch.__version__,
            }
        )
        _publish(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CalibrationSet(root)


def capture_generic(
    module: nn.Module,
    calibrate_fn: Callable[[nn.Module], Any],
    cache_dir: str | Path | None = None,
    key: str | None = None,
    cached_only: bool = False,
) -> CalibrationSet | None:
    """Record every call of ``module`` while ``calibrate_fn(module)`` runs.

    For a plain ``nn.Module`` with the user's own calibration loop (ModelOpt's forward_loop).
    The step index of a sample is its call index; the timestep is read from a ``timestep``
    keyword if there is one.

    Args:
        module: the module to record.
        calibrate_fn: runs ``module`` on representative inputs.
        cache_dir: root of the cache (with ``key``) or where the temporary set goes.
        key: a string naming these inputs; when given, the set is cached under it and a later
            call with the same key returns it without running ``calibrate_fn``. Without a key
            the set lives in a temporary directory removed once the set is no longer used.
        cached_only: with ``key``, return the set only if it is cached (None otherwise).

    Raises:
        UserError: ``calibrate_fn`` never called the module.
    """
    if key is not None:
        digest = hashlib.sha256(
            json.dumps({"format": FORMAT_VERSION, "kind": "generic", "key": key}).encode()
        ).hexdigest()
        cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
        root = cache_root / digest[:32]
        if is_complete(root):
            log.info("calibration cache hit: %s", root)
            return CalibrationSet(root)
        if cached_only:
            return None
        cache_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest[:12]}-", dir=cache_root))
    else:
        digest = None
        if cache_dir is not None:
            Path(cache_dir).expanduser().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="dit-compress-calib-", dir=cache_dir))
    try:
        writer = CalibrationWriter(tmp)
        recorder = _Recorder(writer)
        with recorder.attached(module), torch.no_grad():
            calibrate_fn(module)
        if not writer.samples:
            raise UserError(
                "calibrate_fn never called the module; it must run module(...) on sample inputs"
            )
        writer.close(
            {
                "kind": "generic",
                "hash": digest,
                "key": key,
                "family": "generic",
                "transformer_class": type(module).__name__,
                "dtype": _transformer_dtype(module),
                "torch": torch.__version__,
            }
        )
        if key is None:
            return CalibrationSet(tmp, _owner=_TempDir(tmp))
        _publish(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CalibrationSet(root)
