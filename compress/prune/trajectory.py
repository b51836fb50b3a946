"""A whole denoising trajectory of a diffusers pipeline as one differentiable function.

EcoDiff trains its masks on the final denoised latent, so the gradient must run back through
every denoising step. Diffusers pipelines run under ``torch.no_grad`` (their ``__call__`` and
our ``generate`` both switch it off); :func:`final_latent` calls the family's ``generate`` with
the pipeline's undecorated ``__call__`` under ``torch.enable_grad``, catches the latent the
scheduler returns at its last step (and stops there: no decoding), and with ``checkpoint`` runs
each transformer call under activation checkpointing, so that memory holds one latent per step
rather than every step's activations (time-step gradient checkpointing); the activations of a
step are recomputed when the backward pass reaches it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from compress.errors import UserError


class _Final(Exception):
    def __init__(self, latent: torch.Tensor) -> None:
        super().__init__("final latent")
        self.latent = latent


@contextlib.contextmanager
def _instance_attr(obj: Any, attr: str, value: Any) -> Iterator[None]:
    """``obj.attr = value`` over the class's, undone on exit (an earlier instance value is
    put back, else the class's shows again)."""
    had = obj.__dict__.get(attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        if had is None:
            delattr(obj, attr)
        else:
            setattr(obj, attr, had)


@contextlib.contextmanager
def _grad_pipeline(pipe: Any) -> Iterator[None]:
    """The pipeline instance's ``__call__`` without its ``no_grad``, under ``enable_grad``."""
    cls = type(pipe)
    inner = getattr(cls.__call__, "__wrapped__", cls.__call__)

    def call(self, *a, **k):
        with torch.enable_grad():
            return inner(self, *a, **k)

    pipe.__class__ = type(cls.__name__, (cls,), {"__call__": call})
    try:
        yield
    finally:
        pipe.__class__ = cls


@contextlib.contextmanager
def _last_step(scheduler: Any) -> Iterator[None]:
    """Raise _Final with the latent the scheduler returns at the last of its timesteps."""
    orig = scheduler.step
    seen = [0]

    def step(*a, **k):
        out = orig(*a, **k)
        seen[0] += 1
        if seen[0] >= len(scheduler.timesteps):
            lat = out.prev_sample if hasattr(out, "prev_sample") else out[0]
            raise _Final(lat)
        return out

    with _instance_attr(scheduler, "step", step):
        yield


@contextlib.contextmanager
def _checkpointed(module: torch.nn.Module, on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    orig = module.forward

    def forward(*a, **k):
        return _checkpoint(orig, *a, use_reentrant=False, **k)

    with _instance_attr(module, "forward", forward):
        yield


def final_latent(handle, prompt: str, seed: int, steps: int | None, guidance: float | None,
                 resolution: int | None, checkpoint: bool = True) -> torch.Tensor:
    """The latent the pipeline ends its denoising loop with, for one prompt and seed; with the
    autograd graph back through every step when grad mode is on."""
    pipe = handle.pipeline
    sched = getattr(pipe, "scheduler", None)
    if sched is None or not hasattr(sched, "step"):
        raise UserError(f"prune_width learnable: the {handle.family} pipeline has no scheduler "
                        "to follow; use learnable.objective: calls")
    grad = torch.is_grad_enabled()
    ctx = _grad_pipeline(pipe) if grad else contextlib.nullcontext()
    try:
        with ctx, _last_step(sched), _checkpointed(handle.transformer, checkpoint and grad):
            handle.adapter.generate(pipe, [prompt], [seed], steps, guidance, resolution)
    except _Final as f:
        return f.latent
    raise RuntimeError("the pipeline finished without its scheduler reaching the last timestep")
