"""Several calibration samples (transformer calls) as one batch.

Each sample is one call with its own batch (two rows with classifier-free guidance). Training on
one call at a time leaves a small model's matmuls tiny; stacking the calls along the batch
dimension runs them in one forward. A tensor is stacked when its first dimension is the call's
batch in every sample; any other tensor (position ids, rotary tables) must be the same in every
sample and is passed once. Whether stacking is faithful for a model is checked once, on real
samples, against the calls run one by one (:func:`stacking_works`): a model whose inputs do not
follow the rule is trained one call at a time instead.
"""

from __future__ import annotations

from typing import Any

import torch

from compress.models.trace import tensors_in


def _batch(sample) -> int | None:
    ts = [t for t in tensors_in((sample.args, sample.kwargs)) if t.dim() >= 1]
    return ts[0].shape[0] if ts else None


def sizes(samples: list) -> list[int] | None:
    """Each sample's batch (its rows in a stacked call)."""
    out = [_batch(s) for s in samples]
    return None if None in out else out


def stack(samples: list) -> tuple[tuple, dict[str, Any]] | None:
    """(args, kwargs) of one call running every sample, or None when they do not stack."""
    if len(samples) == 1:
        return samples[0].args, samples[0].kwargs
    sizes = [_batch(s) for s in samples]
    if None in sizes:
        return None

    def go(objs: list):
        first = objs[0]
        if isinstance(first, torch.Tensor):
            if not all(isinstance(o, torch.Tensor) for o in objs):
                raise ValueError
            if first.dim() >= 1 and all(o.dim() == first.dim() and o.shape[0] == b
                                        and o.shape[1:] == first.shape[1:]
                                        for o, b in zip(objs, sizes)):
                return torch.cat(objs, 0)
            if all(o.shape == first.shape and torch.equal(o, first) for o in objs[1:]):
                return first
            raise ValueError
        if isinstance(first, (tuple, list)):
            if any(not isinstance(o, type(first)) or len(o) != len(first) for o in objs):
                raise ValueError
            return type(first)(go([o[i] for o in objs]) for i in range(len(first)))
        if isinstance(first, dict):
            if any(not isinstance(o, dict) or o.keys() != first.keys() for o in objs):
                raise ValueError
            return {k: go([o[k] for o in objs]) for k in first}
        if any(o != first for o in objs[1:]):
            raise ValueError
        return first

    try:
        return go([s.args for s in samples]), go([s.kwargs for s in samples])
    except ValueError:
        return None


def stacking_works(call, samples: list, rtol: float = 1e-4) -> bool:
    """Whether the model run on the stacked samples gives the outputs of the single calls."""
    st = stack(samples)
    if st is None:
        return False
    with torch.no_grad():
        try:
            together = call(*st)
        except Exception:  # noqa: BLE001 - any failure means: do not stack for this model
            return False
        alone = torch.cat([call(s.args, s.kwargs) for s in samples], 0)
    if together.shape != alone.shape:
        return False
    err = (together.float() - alone.float()).abs().max()
    return bool(err <= rtol * alone.float().abs().max().clamp_min(1e-12) + 1e-5)
