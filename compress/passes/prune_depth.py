"""prune_depth: remove whole transformer blocks, chosen from the calibration samples.

Methods (per block list: FLUX's double and single blocks are pruned separately, a user's module
per block container):

- ``influence``: ShortGPT's block influence, 1 - cos(input, output) of the block's streams per
  token; the least influential blocks go.
- ``skip_error``: the transformer's output error with the one block skipped; the blocks whose
  absence costs least go.
- ``intervals``: PPCL-style contiguous intervals: each block gets a linear probe, an interval is
  scored by the output similarity with it replaced by its probes, and the cheapest disjoint
  intervals are collapsed to their first block (``distill`` then trains that block on the
  teacher's hidden states at the interval's ends).
- ``learnable``: TinyFusion-style: blocks in local groups, a Gumbel-softmax choice per group
  trained jointly with low-rank adapters against the original's outputs.
- ``random`` and ``last``: baselines; ``list``: the blocks named in ``blocks``.

Blocks are removed physically and the config updated (``num_layers``, FLUX's
``num_single_layers``, SD3's ``dual_attention_layers``), so diffusers families reload with stock
``DiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import random
import time
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.config import MAX_COUNT, StrictModel
from compress.errors import UserError
from compress.models import depth
from compress.prune import depth_scores as ds
from compress.registry import PassDef, PassResult, register_pass
from compress.train.kd import Taps, containers


class Learnable(StrictModel):
    """TinyFusion settings (method: learnable)."""

    group_size: int | None = Field(None, ge=2, le=64, description="blocks per local group "
                                   "(null: the smallest group in which ratio drops whole blocks)")
    steps: int = Field(300, ge=1, le=MAX_COUNT, description="optimiser steps")
    batch: int = Field(4, ge=1, le=4096, description="calibration samples per step")
    lr: float = Field(0.05, gt=0, le=10, description="learning rate of the choice logits")
    lora_rank: int = Field(8, ge=0, le=1024, description="adapters' rank (0: none)")
    lora_lr: float = Field(1e-4, gt=0, le=1, description="learning rate of the adapters")
    tau_start: float = Field(4.0, gt=0, le=100, description="Gumbel temperature at the start")
    tau_end: float = Field(0.1, gt=0, le=100, description="... annealed to this at the end")
    checkpoint_every: int = Field(100, ge=0, le=MAX_COUNT)


class Config(StrictModel):
    """prune_depth pass configuration."""

    method: Literal["influence", "skip_error", "intervals", "learnable", "random", "last",
                    "list"] = "influence"
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of each block list "
                                "removed (rounded to whole blocks)")
    remove: int | None = Field(None, ge=1, le=10_000, description="blocks removed per list")
    blocks: list[str] | None = Field(None, min_length=1, description="method list: block names "
                                     "as `dit-compress inspect` shows them")
    calib_samples: int = Field(16, ge=1, le=MAX_COUNT, description="calibration samples scored")
    max_interval: int = Field(4, ge=2, le=64, description="intervals: longest interval")
    learnable: Learnable = Field(default_factory=Learnable)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.method == "list":
            if not self.blocks or self.ratio is not None or self.remove is not None:
                raise ValueError("method list takes the block names in 'blocks' (and no "
                                 "ratio/remove)")
            if len(set(self.blocks)) != len(self.blocks):
                raise ValueError("blocks: a block is listed twice")
        else:
            if self.blocks is not None:
                raise ValueError(f"'blocks' lists blocks for method list; method {self.method} "
                                 "chooses them itself (drop blocks or set method: list)")
            if (self.ratio is None) == (self.remove is None):
                raise ValueError("give exactly one of ratio (fraction of the blocks) or remove "
                                 "(blocks per list)")
        return self


def _targets(handle, cfg: Config) -> dict[str, int]:
    """Blocks to remove per container."""
    names = [n for n, _ in handle.adapter.blocks(handle.transformer)]
    out = {}
    for cont, blocks in containers(names).items():
        n = cfg.remove if cfg.remove is not None else round(cfg.ratio * len(blocks))
        out[cont] = min(n, len(blocks) - 1)
    return out


def check(handle, cfg: Config) -> None:
    """Before any work: the blocks exist and may go, and every list keeps a block."""
    if handle.pipeline is None:
        return  # a module's blocks come from the trace of the first calibration call
    _check(handle, cfg)


def _check(handle, cfg: Config) -> None:
    tr, ad = handle.transformer, handle.adapter
    if cfg.method == "list":
        depth.check_removal(tr, ad, list(cfg.blocks))
        return
    targets = _targets(handle, cfg)
    rem = set(depth.removable(tr, ad))
    names = [n for n, _ in ad.blocks(tr)]
    for cont, blocks in containers(names).items():
        can = sum(b in rem for b in blocks)
        if targets[cont] > can:
            raise UserError(f"prune_depth: {cont} has {can} removable blocks, the recipe asks "
                            f"to remove {targets[cont]}; lower ratio/remove")
    if sum(targets.values()) == 0:
        raise UserError("prune_depth: ratio/remove removes no block on this model (too few "
                        "blocks per list); raise it or use method: list")


def _runner(handle, samples):
    """run(i): the current transformer on calibration sample i (no grad); outputs kept."""
    cache = {}

    def run(i: int) -> torch.Tensor:
        if i not in cache:
            cache[i] = samples.sample(i).to(handle.run.get("device", "cpu"))
        s = cache[i]
        with torch.no_grad():
            return handle.adapter.call(handle.transformer, s.args, s.kwargs)
    return run


def _lowest(scores: dict[str, float], targets: dict[str, int], rem: set[str]) -> list[str]:
    out = []
    for cont, blocks in containers(list(scores)).items():
        cand = sorted((b for b in blocks if b in rem), key=lambda b: (scores[b], b))
        out += cand[: targets.get(cont, 0)]
    return out


def _intervals(handle, run, taps, blocks, pairing, n, cfg, targets, rem, report) -> list[str]:
    """PPCL-style: per container, every interval of up to max_interval blocks is replaced by one
    linear probe and scored by the output error; the cheapest disjoint intervals that remove
    the wanted count are collapsed to their first block."""
    tr = handle.transformer
    refs = [run(i) for i in range(n)]
    chosen: list[str] = []
    table = {}
    for cont, names in containers(blocks).items():
        if not targets.get(cont):
            continue
        probes = ds.fit_interval_probes(run, taps, names, pairing, n, cfg.max_interval)
        scores = {}
        for (a, b), probe in probes.items():
            hooks = ds.interval_hooks(tr, names, a, b, probe, pairing)
            try:
                scores[(a, b)] = sum(ds.relative_error(run(i), refs[i]) for i in range(n)) / n
            finally:
                for h in hooks:
                    h.remove()
        picked = ds.choose_intervals(scores, len(names), targets[cont],
                                     lambda p, _n=names: _n[p] in rem)
        if sum(b - a for a, b in picked) != targets[cont]:
            raise UserError(f"prune_depth: no set of intervals of at most {cfg.max_interval} "
                            f"blocks removes {targets[cont]} from {cont}; raise max_interval")
        for a, b in picked:
            chosen += names[a + 1:b + 1]
            table[f"{names[a]}..{names[b]}"] = round(scores[(a, b)], 6)
    report["intervals"] = table
    return chosen


def apply(handle, calib, cfg: Config) -> PassResult:
    tr, ad = handle.transformer, handle.adapter
    t0 = time.perf_counter()
    if handle.pipeline is None:
        _check(handle, cfg)  # a module's blocks are known once its first call was traced
    blocks = [n for n, _ in ad.blocks(tr)]
    rem = set(depth.removable(tr, ad))
    report: dict = {"method": cfg.method, "blocks_before": len(blocks)}
    if cfg.method == "list":
        names = list(cfg.blocks)
    else:
        targets = _targets(handle, cfg)
        if cfg.method == "last":
            names = []
            for cont, bl in containers(blocks).items():
                names += [b for b in bl if b in rem][len([b for b in bl if b in rem])
                                                     - targets[cont]:]
        elif cfg.method == "random":
            rng = random.Random(cfg.seed)
            names = []
            for cont, bl in containers(blocks).items():
                names += rng.sample([b for b in bl if b in rem], targets[cont])
        else:
            samples = calib.subset(cfg.calib_samples)
            n = len(samples)
            run = _runner(handle, samples)
            taps = Taps(tr, blocks, inputs=blocks, detach=True)
            try:
                infl, pairing = ds.influence(run, taps, blocks, n)
                if cfg.method == "influence":
                    scores = infl
                elif cfg.method == "skip_error":
                    taps.remove()
                    refs = [run(i) for i in range(n)]
                    scores = ds.skip_error(run, refs, lambda b: depth.without_blocks(tr, ad, b),
                                           blocks)
                elif cfg.method == "intervals":
                    names = _intervals(handle, run, taps, blocks, pairing, n, cfg, targets, rem,
                                       report)
                    scores = None
                else:  # learnable
                    taps.remove()
                    from compress.prune.learnable_depth import learn

                    names = learn(handle, samples, blocks, pairing, targets, rem, cfg, report)
                    scores = None
            finally:
                taps.remove()
            if scores is not None:
                report["scores"] = {b: round(v, 6) for b, v in scores.items()}
                names = _lowest(scores, targets, rem)
    depth.check_removal(tr, ad, names)
    before = sum(p.numel() for p in tr.parameters())
    meta = depth.remove_blocks(tr, ad, names)
    now = [n for n, _ in ad.blocks(tr)]
    origin = handle.block_origin() if handle.origin is not None else {}
    handle.origin = {new: origin.get(old, old) for new, old in zip(now, meta["kept"])}
    after = sum(p.numel() for p in tr.parameters())
    report.update({"removed": meta["removed"], "blocks_after": len(now),
                   "params_before": before, "params_after": after,
                   "scoring_seconds": round(time.perf_counter() - t0, 3)})
    return PassResult(meta=meta, report=report)


def restore(transformer: nn.Module, cfg: Config, meta: dict) -> None:
    from compress.models import adapter_for

    depth.restore_removed(transformer, adapter_for(transformer, allow_generic=True), meta)


register_pass(PassDef(name="prune_depth", config=Config, apply=apply, restore=restore,
                      kind="structural", check=check, needs_teacher=False))
