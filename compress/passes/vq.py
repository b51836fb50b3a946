"""vq: vector quantisation of the transformer's Linear layers (2 and 3 bits a weight).

Each selected weight is cut into sub-vectors of ``dim`` consecutive inputs; a codebook of
``codebook_size`` codewords (one per layer, or per ``codebook_rows`` output rows) is initialised
by k-means weighted by the layer's input importance (the diagonal of its input Hessian), and
each sub-vector stores the index of one codeword. Methods:

- ``vq4dit`` (default): VQ4DiT's calibration, block by block: the ``candidates`` nearest
  codewords of each sub-vector with learnable ratios, a regulariser towards hard choices and
  freezing, fitted with RMSprop to the original model's block outputs; each block is fed the
  outputs of the already-quantised earlier blocks. Layers outside the blocks are fitted on
  their own outputs.
- ``gptvq``: columns quantised in order with the error fed forward through the inverse
  Hessian (GPTVQ-style), no training.
- ``kmeans``: nearest codeword after k-means, no calibration of the assignment.

``finetune`` then trains every codebook jointly, assignments fixed, against the original
transformer's outputs on the calibration samples. Zero-data calibration is a property of the
calibration set: ``calibration.prompts: random`` (random prompts or class labels).
"""

from __future__ import annotations

import copy
import time
from typing import Annotated, Literal

import torch
from pydantic import BeforeValidator, Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from compress.config import MAX_COUNT, StrictModel, check_selectors
from compress.errors import UserError
from compress.modules.swap import set_submodule
from compress.quant import vq
from compress.quant.qtensor import sqnr_db
from compress.registry import PassDef, PassResult, register_pass
from compress.targets import select

DEFAULT_INCLUDE = ["attn_qkv", "attn_out", "cross_attn", "ff_in", "ff_out"]
PRESETS = {2: (4, 256), 3: (2, 64)}  # bits -> (sub-vector length, codewords), as VQ4DiT


def _whole(v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"must be a whole number, not {v!r}")  # noqa: TRY004
    return v


class Finetune(StrictModel):
    """Codebook fine-tuning with assignments fixed, against the original transformer's outputs."""

    iters: int = Field(200, ge=1, le=MAX_COUNT, description="optimiser steps")
    lr: float = Field(1e-4, gt=0, le=1, description="RMSprop learning rate of the codebooks")


class Config(StrictModel):
    """vq pass configuration."""

    bits: Annotated[Literal[2, 3], BeforeValidator(_whole)] = Field(
        2, description="preset: 2 -> dim 4, 256 codewords; 3 -> dim 2, 64 codewords")
    dim: int | None = Field(None, ge=1, le=16, description="sub-vector length (overrides bits)")
    codebook_size: int | None = Field(None, ge=2, le=256,
                                      description="codewords per codebook (overrides bits)")
    codebook_rows: int | None = Field(None, ge=1, le=1 << 20,
                                      description="output rows per codebook (null: one per layer)")
    method: Literal["vq4dit", "gptvq", "kmeans"] = "vq4dit"
    init: Literal["kmeans", "gptvq"] = Field(
        "kmeans", description="vq4dit: start from k-means' nearest codewords, or from GPTVQ's "
        "Hessian-aware assignment")
    importance: Literal["hessian", "none"] = Field(
        "hessian", description="k-means weighted by the input Hessian's diagonal, or unweighted")
    kmeans_iters: int = Field(100, ge=1, le=10_000)
    candidates: int = Field(2, ge=1, le=8, description="vq4dit: nearest codewords per sub-vector")
    iters: int = Field(1000, ge=0, le=MAX_COUNT, description="vq4dit: steps per block")
    lr_codebook: float = Field(1e-4, ge=0, le=1)
    lr_logits: float = Field(5e-2, ge=0, le=100)
    reg: float = Field(1.0, ge=0, le=1e6, description="weight of the r(1-r) regulariser "
                       "(mean over the sub-vectors not yet frozen, summed over candidates)")
    freeze_at: float = Field(0.99, gt=0.5, le=1.0, description="ratio that freezes a choice")
    target: Literal["teacher", "block"] = Field(
        "teacher", description="teacher: the original model's block outputs; block: the "
        "original block on the quantised model's inputs")
    damp: float = Field(0.01, gt=0, le=1, description="gptvq: Hessian dampening")
    calib_samples: int = Field(64, ge=1, le=MAX_COUNT,
                               description="calibration samples (transformer calls) used")
    finetune: Finetune | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)
    include: list[str] = Field(default_factory=lambda: list(DEFAULT_INCLUDE), min_length=1)
    exclude: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        check_selectors(self.include, "include")
        check_selectors(self.exclude, "exclude")
        if (self.dim is None) != (self.codebook_size is None):
            raise ValueError("give dim and codebook_size together (or neither, to use bits)")
        if self.init == "gptvq" and self.method == "kmeans":
            raise ValueError("init: gptvq with method: kmeans contradicts itself; use method: "
                             "gptvq (no calibration) or init: kmeans")
        return self

    def shape(self) -> tuple[int, int]:
        """(sub-vector length, codewords)."""
        return (self.dim, self.codebook_size) if self.dim else PRESETS[self.bits]

    def needs_data(self) -> bool:
        return (self.method != "kmeans" or self.importance == "hessian" or bool(self.finetune)
                or self.init == "gptvq")


def layer_bits(out_f: int, in_f: int, cfg: Config) -> float:
    """Stored bits a weight: indices plus the fp16 codebooks' share."""
    d, k = cfg.shape()
    g = vq.row_groups(out_f, cfg.codebook_rows)
    idx_bits = out_f * (-(-(in_f // d) // 8) * vq.index_bits(k) * 8 if vq.index_bits(k) < 8
                        else in_f // d * 8)
    return (idx_bits + g * k * d * 16) / (out_f * in_f)


def _chosen(handle, cfg: Config):
    d, _ = cfg.shape()
    chosen = select(handle.adapter, handle.transformer, cfg.include, cfg.exclude, types=(nn.Linear,))
    ok = [(n, m, r) for n, m, r in chosen if m.in_features % d == 0]
    skipped = [n for n, m, _ in chosen if m.in_features % d]
    if not ok:
        raise UserError(f"vq: no Linear layer matches include={cfg.include} exclude={cfg.exclude}"
                        + (f" with inputs a multiple of dim {d}" if skipped else ""))
    return ok, skipped


def apply(handle, calib, cfg: Config) -> PassResult:
    from compress.modules.vq_linear import VQLinear
    from compress.quant.collect import stages
    from compress.quant.vq_calib import SoftVQLinear

    tr = handle.transformer
    prepare = getattr(handle.adapter, "prepare", None)
    prepared = prepare(tr) if prepare is not None else []
    chosen, skipped = _chosen(handle, cfg)
    if cfg.needs_data() and (calib is None or len(calib) == 0):
        raise UserError("vq: method/importance/finetune need calibration data (or use "
                        "method: kmeans, importance: none)")
    roles = {n: r for n, _, r in chosen}
    total_params = sum(p.numel() for p in tr.parameters())
    sub = calib.subset(max_samples=cfg.calib_samples) if calib is not None else None
    teacher = copy.deepcopy(tr).eval() if cfg.method == "vq4dit" or cfg.finetune else None
    if teacher is not None and handle.pipeline is None:
        from compress.models.generic import share_structure

        share_structure(tr, teacher)  # the copy has the same blocks and roles
    for p in (teacher.parameters() if teacher is not None else ()):
        p.requires_grad_(False)
    final_ref = _final_outputs(handle, teacher, sub) if cfg.finetune else None

    rows, per_block = [], []
    soft: dict[str, SoftVQLinear] = {}
    bar = tqdm(stages(handle, [n for n, _, _ in chosen]), desc="vq", leave=False)
    for stage, names in bar:
        t0 = time.perf_counter()
        stats = _collect(handle, sub, stage, names, cfg) if sub is not None else None
        originals = {n: tr.get_submodule(n).weight.detach().float().cpu().clone() for n in names}
        for n in names:
            soft[n] = _init_layer(tr.get_submodule(n), n, stats, cfg)
            set_submodule(tr, n, soft[n])
        fit = None
        if cfg.method == "vq4dit" and cfg.iters > 0:
            layers = [soft[n] for n in names]
            fit = (_fit_block(handle, teacher, sub, stage, layers, cfg, bar) if stage is not None
                   else _fit_layers(layers, {n: stats["rows"].get(n) for n in names},
                                    originals, cfg))
        for m in soft.values():
            m.hard = True
        per_block.append({"stage": stage or "(outside the blocks)", "layers": len(names),
                          "seconds": round(time.perf_counter() - t0, 3),
                          **({k: round(v, 6) for k, v in fit.items()} if fit else {})})
        for n in names:
            rows.append(_layer_row(n, roles[n], soft[n], stats, originals[n], cfg))
    ft = _finetune(handle, sub, soft, final_ref, cfg) if cfg.finetune else None

    meta_layers = {}
    for n, m in soft.items():
        new = VQLinear.from_assignment(m.books.detach(), m.choice(), m.bias_, cfg.codebook_rows)
        set_submodule(tr, n, new)
        meta_layers[n] = {"in": m.in_features, "out": m.out_features,
                          "bias": m.bias_ is not None, "rows": new.rows}
    from compress.passes.ptq import forward_coverage

    used = forward_coverage(handle, calib, list(meta_layers))
    d, k = cfg.shape()
    q = sum(m["in"] * m["out"] for m in meta_layers.values())
    stored = sum(layer_bits(m["out"], m["in"], cfg) * m["in"] * m["out"]
                 for m in meta_layers.values())
    report = {
        "method": cfg.method, "dim": d, "codebook_size": k,
        "layers_quantized": len(meta_layers),
        "weights_quantized_fraction": q / max(1, total_params),
        "weights_quantized_and_used_fraction": (
            None if used is None
            else sum(meta_layers[n]["in"] * meta_layers[n]["out"] for n in used) / total_params),
        "bits_per_weight_vq_layers": stored / max(q, 1),
        "layers": rows, "blocks": per_block,
        **({"skipped": {"layers": skipped, "why": f"inputs not a multiple of dim {d}"}}
           if skipped else {}),
        **({"finetune": ft} if ft else {}),
        **({"prepared": prepared} if prepared else {}),
    }
    meta = {"dim": d, "codebook_size": k, "layers": meta_layers,
            **({"prepared": prepared} if prepared else {})}
    return PassResult(meta=meta, report=report)


def _collect(handle, sub, stage, names, cfg: Config) -> dict:
    """Input Hessians (importance, GPTVQ) and input rows (errors, layer-wise fits) of a stage,
    under the current, partly quantised, transformer."""
    from compress.quant.collect import RowSampler, run_stage
    from compress.quant.observers import attach

    tr = handle.transformer
    mods = {n: tr.get_submodule(n) for n in names}
    obs = attach(mods, act=False, hessian=True)
    rs = RowSampler(mods, max_rows=512)
    try:
        run_stage(handle, sub, stage, len(sub))
    finally:
        obs.remove()
        rs.remove()
    return {"hessian": {n: obs.hessian[n].mean() for n in names}, "rows": rs}


def _init_layer(mod: nn.Linear, name: str, stats, cfg: Config):
    from compress.quant.vq_calib import SoftVQLinear

    d, k = cfg.shape()
    # the codebook maths runs on the CPU (observers keep Hessians there); the layer goes back
    # to the weight's device
    w = mod.weight.detach().float().cpu()
    h = stats["hessian"][name].cpu() if stats is not None else None
    seed = cfg.seed + (hash_name(name) % 1000)
    imp = torch.diagonal(h) if h is not None and cfg.importance == "hessian" else None
    if cfg.method == "gptvq" or cfg.init == "gptvq":
        books, idx = vq.gptvq(w, h, d, k, cfg.codebook_rows, cfg.kmeans_iters, seed, cfg.damp)
        if cfg.method == "gptvq":
            cand, dist = idx[..., None], torch.zeros(*idx.shape, 1)
        else:  # calibration starts from GPTVQ's choice, with the nearest codewords as rivals
            cand, dist = vq.assign_nearest(w, books, cfg.codebook_rows, imp, cfg.candidates)
            missing = ~(cand == idx[..., None]).any(-1)
            cand[..., -1] = torch.where(missing, idx, cand[..., -1])
            hit = cand == idx[..., None]
            # its ratio starts three times its rivals' (ratios go as 1 / sqrt(distance))
            dist = torch.where(hit, dist.min(-1, keepdim=True).values / 9, dist)
    else:
        books, _ = vq.init_codebooks(w, d, k, cfg.codebook_rows, imp, cfg.kmeans_iters, seed)
        n = cfg.candidates if cfg.method == "vq4dit" else 1
        cand, dist = vq.assign_nearest(w, books, cfg.codebook_rows, imp, n)
    return SoftVQLinear(books, cand, dist, mod.bias, cfg.codebook_rows).to(mod.weight.device)


def hash_name(name: str) -> int:
    """A stable per-layer seed offset (Python's hash() of a str changes between runs)."""
    import zlib

    return zlib.crc32(name.encode())


def _fit_block(handle, teacher, sub, stage, layers, cfg: Config, bar) -> dict:
    from compress.quant.vq_calib import calibrate, output_tensors

    tr = handle.transformer
    block = tr.get_submodule(stage)
    ref_block = teacher.get_submodule(stage)
    inputs = list(sub.block_inputs(tr, handle.adapter, stage))
    src = inputs if cfg.target == "block" else list(sub.block_inputs(teacher, handle.adapter, stage))
    with torch.no_grad():
        refs = [[t.detach() for t in output_tensors(ref_block(*a, **kw))] for a, kw in src]
    frozen = [p for p in block.parameters() if p.requires_grad and
              not any(p is q for m in layers for q in (m.books, m.logits))]
    for p in frozen:
        p.requires_grad_(False)

    def run(i):
        a, kw = inputs[i]
        return block(*a, **kw)

    def progress(it, loss):
        if it % 50 == 0:
            bar.set_postfix_str(f"{stage} it {it}/{cfg.iters} loss {loss:.3g}")

    try:
        with torch.enable_grad():
            return calibrate(layers, run, refs, cfg.iters, cfg.lr_codebook, cfg.lr_logits,
                             cfg.reg, cfg.freeze_at, cfg.seed, progress)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _fit_layers(layers, rows: dict, weights: dict, cfg: Config) -> dict:
    """Layers outside the blocks: each fitted on its own output over its sampled input rows."""
    from compress.quant.vq_calib import calibrate

    out = {"loss_first": 0.0, "loss_last": 0.0, "frozen": 0.0}
    for m, (n, x) in zip(layers, rows.items()):
        ref = [(x @ weights[n].T + (m.bias_ if m.bias_ is not None else 0))]
        with torch.enable_grad():
            r = calibrate([m], lambda i, m=m, x=x: m(x), [ref], cfg.iters, cfg.lr_codebook,
                          cfg.lr_logits, cfg.reg, cfg.freeze_at, cfg.seed)
        out = {k: out[k] + r[k] / len(layers) for k in out}
    return out


def _final_outputs(handle, teacher, sub) -> list[torch.Tensor]:
    with torch.no_grad():
        return [handle.adapter.call(teacher, s.args, s.kwargs).detach()
                for s in (sub.sample(i) for i in range(len(sub)))]


def _finetune(handle, sub, soft: dict, refs: list[torch.Tensor], cfg: Config) -> dict:
    """All codebooks at once, assignments fixed, against the original transformer's outputs."""
    tr = handle.transformer
    books = [m.books for m in soft.values()]
    others = [p for p in tr.parameters() if p.requires_grad and not any(p is b for b in books)]
    for p in others:
        p.requires_grad_(False)
    opt = torch.optim.RMSprop(books, lr=cfg.finetune.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    order: list[int] = []
    try:
        with torch.enable_grad():
            for _ in tqdm(range(cfg.finetune.iters), desc="vq finetune", leave=False):
                if not order:
                    order = torch.randperm(len(sub), generator=g).tolist()
                i = order.pop()
                s = sub.sample(i)
                out = handle.adapter.call(tr, s.args, s.kwargs)
                ref = refs[i]
                loss = (out.float() - ref.float()).pow(2).mean() / (ref.float().pow(2).mean() + 1e-12)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss))
    finally:
        for p in others:
            p.requires_grad_(True)
    with torch.no_grad():
        for b in books:
            b.copy_(b.half().float())
    t = max(1, len(losses) // 10)
    return {"iters": len(losses), "loss_first": sum(losses[:t]) / t,
            "loss_last": sum(losses[-t:]) / t}


@torch.no_grad()
def _layer_row(name, role, m, stats, w_ref: torch.Tensor, cfg: Config) -> dict:
    """Bits and errors of one layer as quantised now (codebook fine-tuning may move them)."""
    wq = m.weight().detach().float().cpu()
    row = {"layer": name, "role": role, "in": m.in_features, "out": m.out_features,
           "bits": round(layer_bits(m.out_features, m.in_features, cfg), 4),
           "weight_sqnr_db": round(sqnr_db(w_ref, wq), 2)}
    x = stats["rows"].get(name) if stats is not None else None
    if x is not None:
        row["output_sqnr_db"] = round(sqnr_db(x @ w_ref.T, x @ wq.T), 2)
    return row


def restore(transformer: nn.Module, cfg: Config, meta: dict) -> None:
    from compress.modules.vq_linear import VQLinear

    if meta.get("prepared"):
        from compress.models.generic import restore_prepared

        restore_prepared(transformer, meta["prepared"])
    d, k = int(meta["dim"]), int(meta["codebook_size"])
    for name, m in meta["layers"].items():
        set_submodule(transformer, name, VQLinear(int(m["in"]), int(m["out"]), bool(m["bias"]),
                                                  d, k, m.get("rows"), device="meta"))


def check(handle, cfg: Config) -> None:
    """Before any work: selectors name Linear layers of this model; on a pipeline, include
    selects at least one layer whose input width is a multiple of the sub-vector length."""
    from compress.targets import check_in_model

    check_in_model(handle.transformer, "vq", (nn.Linear,),
                   {"include": cfg.include, "exclude": cfg.exclude})
    if handle.pipeline is None:
        return  # a module's roles come from the trace of the first calibration call
    _chosen(handle, cfg)


register_pass(PassDef(name="vq", config=Config, apply=apply, restore=restore, kind="format",
                      needs_calibration=False, check=check))
