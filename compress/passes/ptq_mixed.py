"""ptq's mixed precision: per-layer sensitivities (output error on captured inputs, and the
image error of sampling with one layer quantised where a pipeline or the user's sampler can
sample), then a bit allocation under the recipe's average-bits budget."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from compress.errors import UserError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from compress.passes.ptq import Config, WeightSpec


def _sig(x: float) -> float:
    """Four significant digits: errors span many decades, fixed decimals would zero the small."""
    return float(f"{x:.4g}")


def _image_sampler(handle, calib, mp):
    """What mixed precision's image metric samples: the pipeline on the first calibration
    prompts, or the user's sampler on seeds 0..image_prompts-1; None when neither exists."""
    import numpy as np

    if handle.pipeline is not None and handle.adapter.generate:
        m = calib.meta
        prompts = list(m["prompts"])[: mp.image_prompts]
        seeds = list(m["seeds"])[: mp.image_prompts]

        def generate():
            imgs = handle.adapter.generate(handle.pipeline, prompts, seeds, mp.image_steps,
                                           m.get("guidance"), m.get("resolution"))
            return np.asarray(imgs, dtype=np.float32), "images"
        return generate
    if handle.sample_fn is not None:
        from compress.metrics.own import own_samples

        def generate():
            arr, _, kind = own_samples(handle.sample_fn, handle.transformer,
                                       list(range(mp.image_prompts)), progress=False)
            return arr, kind
        return generate
    return None


def _latents(handle, calib, mp):
    """The pipeline's final latents on the first calibration prompts, differentiable through
    every denoising step (time-step gradient checkpointing)."""
    from compress.prune.trajectory import final_latent

    m = calib.meta
    prompts = list(m["prompts"])[: mp.image_prompts]
    seeds = list(m["seeds"])[: mp.image_prompts]

    def run():
        return [final_latent(handle, p, s, mp.image_steps, m.get("guidance"),
                             m.get("resolution")) for p, s in zip(prompts, seeds)]
    return run


def candidates_of(mp, names, aux: set[str]) -> dict[str, tuple[int, ...]]:
    """Each layer's bit options: the recipe's candidates, plus 16 (kept) for auxiliary ones."""
    return {n: tuple(sorted(set(mp.candidates) | ({16} if n in aux else set()))) for n in names}


def stored_bits(bits: int, fan_in: int, spec, ragged_layer: bool, gguf: bool) -> float:
    """Stored bits a weight of one layer at ``bits``: codes plus scales, or (``gguf``: counted
    as a GGUF file holds it) 32 for a layer kept float or one the file cannot block."""
    from compress.quant import mixed

    if gguf and (ragged_layer or bits >= mixed.FLOAT_BITS):
        return 32.0
    return mixed.bits_per_weight(bits, fan_in, spec.group(), spec.symmetric)


def cheapest_avg_bits(mods: dict, specs: dict, cands: dict[str, tuple[int, ...]],
                      keep: list[str], floats: set[str] | frozenset = frozenset(),
                      gguf: bool = False) -> float:
    """Stored bits a weight of the cheapest allocation: per-row (or per-group) fp16 scales
    cost 16/in bits a weight, so on narrow layers (a small model, a 4-channel embedder) even
    all-lowest can exceed a budget; keep_high layers count at their highest option. ``gguf``:
    as a GGUF file stores them (float layers and ``floats``, which it cannot block, at F32)."""
    total = cost = 0.0
    for n, m in mods.items():
        w = m.weight
        fan_in, numel = w[0].numel(), w.numel()
        bits = [max(cands[n])] if n in keep else cands[n]
        cost += numel * min(stored_bits(b, fan_in, specs[n], n in floats, gguf)
                            for b in bits)
        total += numel
    return cost / max(total, 1)


def ragged(mods: dict) -> set[str]:
    """Layers a GGUF file keeps float: convolutions, and rows not a whole number of its blocks
    of 32 inputs."""
    return {n for n, m in mods.items() if m.weight.dim() != 2 or m.weight.shape[1] % 32}


def budget_bits(mp, tr, mods: dict) -> tuple[float, float | None]:
    """(the budget in stored bits a weight over ``mods``, its file bytes or None). With
    ``size_of``: the bytes of ``tr`` written at that GGUF type (export-gguf --type), less what
    our file holds beside ``mods``' weights (every other tensor, F32 as the exporter writes it)."""
    if mp.size_of is None:
        return mp.avg_bits, None
    from compress.io.gguf_export import plain_file_bytes

    target = plain_file_bytes(tr, mp.size_of)
    ours = {f"{n}.weight" for n in mods}
    rest = sum(t.numel() * 4 for k, t in tr.state_dict().items() if k not in ours)
    weights = sum(m.weight.numel() for m in mods.values())
    return (target - rest) * 8 / max(weights, 1), target


def budget_of(mp, tr, mods: dict, specs: dict, cands: dict[str, tuple[int, ...]],
              keep: list[str]) -> tuple[float, float | None, float, set[str]]:
    """(budget in bits a weight, its file bytes or None, the cheapest allocation's bits a
    weight, the layers a GGUF file keeps float), refusing an unreachable budget in one line
    when the recipe asks to. Before any work (the ptq check) and again at allocation."""
    gguf = mp.size_of is not None  # the budget is a GGUF file's: count bytes as it holds them
    floats = ragged(mods) if gguf else set()  # float in that file, whatever the bits
    cheapest = cheapest_avg_bits(mods, specs, cands, keep, floats, gguf)
    budget, budget_bytes = budget_bits(mp, tr, mods)
    refuse_unreachable(mp, cheapest, budget)
    return budget, budget_bytes, cheapest, floats


def refuse_unreachable(mp, cheapest: float, budget: float) -> None:
    if cheapest > budget and mp.if_unreachable == "refuse":
        what = f"size_of {mp.size_of} ({budget:.3f} bits a weight)" if mp.size_of \
            else f"avg_bits {budget}"
        raise UserError(f"ptq.mixed_precision: {what} is below this model's "
                        f"cheapest allocation ({cheapest:.3f} bits a weight: per-row scales on "
                        "narrow layers); raise the budget, narrow include, or set "
                        "if_unreachable: cheapest")


def allocate_bits(handle, calib, cfg: Config, specs: dict[str, WeightSpec], roles,
                  aux: set[str], act: set[str]):
    """Sensitivities by output error (and image PSNR when there is a pipeline), then allocate.

    Every integer-format layer takes part (fp8 ones keep their format). Auxiliary layers
    (embedders, adaLN, the final projection, convs outside the blocks) are weight-only and may
    also stay in 16 bits, which the budget counts at 16 bits a weight.
    """
    from compress.quant import mixed
    from compress.quant.collect import RowSampler, run_stage
    from compress.quant.sensitivity import (
        Choice,
        first_order_tables,
        image_tables,
        output_tables,
    )
    from compress.targets import matches

    mp = cfg.mixed_precision
    tr = handle.transformer
    mods = {n: tr.get_submodule(n) for n, s in specs.items() if s.format == "int"}
    if not mods:
        return {}, None
    keep = [n for n in mods if any(matches(sel, n, roles[n]) for sel in mp.keep_high)]
    cands = candidates_of(mp, mods, aux)
    # refused before the sensitivity analysis, which takes minutes
    budget, budget_bytes, cheapest, floats = budget_of(mp, tr, mods, specs, cands, keep)
    gguf = mp.size_of is not None
    rs = RowSampler(mods, max_rows=256)
    try:
        run_stage(handle, calib, None, cfg.calib_samples)
    finally:
        rs.remove()
    weights = {n: m.weight.detach().float().flatten(1) for n, m in mods.items()}
    inputs = {n: rs.get(n) for n in mods}
    a_bits = cfg.activations.bits if cfg.activations is not None else None
    choices = {
        n: Choice(cands[n],
                  specs[n].group(), specs[n].symmetric, a_bits if n in act else None,
                  getattr(m, "groups", 1))
        for n, m in mods.items()
    }
    tables = []
    out_t = output_tables(weights, inputs, choices)
    tables.append(mixed.normalise(out_t))
    img_t = None
    estimate = "measure"
    if "image" in mp.metrics and mp.image_estimate == "first_order" \
            and handle.pipeline is not None:
        img_t, estimate = first_order_tables(_latents(handle, calib, mp), mods, choices,
                                             mp.image_probes), "first_order"
        tables.append(mixed.normalise(img_t))
    gen = _image_sampler(handle, calib, mp) if "image" in mp.metrics and img_t is None else None
    if gen is not None:
        img_t = image_tables(gen, mods, choices)
        tables.append(mixed.normalise(img_t))
    sens = mixed.combine(tables)
    params = {n: w.numel() for n, w in weights.items()}

    def cost(n: str, b: int) -> float:
        return stored_bits(b, weights[n].shape[1], specs[n], n in floats, gguf)

    wanted = budget
    if cheapest > budget:
        log.warning("ptq.mixed_precision: the budget (%.3f bits a weight) is below this model's "
                    "cheapest allocation (%.3f: scales on narrow layers); using the cheapest",
                    budget, cheapest)
        budget = cheapest * (1 + 1e-9)
    try:
        alloc = mixed.allocate(sens, params, avg_bits=budget, cost=cost, keep_high=keep)
    except ValueError as exc:
        raise UserError(f"ptq.mixed_precision: {exc}; raise avg_bits or narrow include/keep_high"
                        ) from None
    table = [
        {"layer": n, "role": roles[n], "bits": alloc.bits[n], "params": params[n],
         "act_bits": choices[n].a_bits,
         **{f"out_err@{b}": _sig(out_t[n][b]) for b in choices[n].candidates},
         **({f"img_err@{b}": _sig(img_t[n][b]) for b in choices[n].candidates}
            if img_t else {})}
        for n in mods
    ]
    kept = [n for n in mods if alloc.bits[n] >= mixed.FLOAT_BITS]
    size = {} if budget_bytes is None else {
        "budget_size_of": mp.size_of, "budget_bytes": round(budget_bytes),
        "gguf_float_layers": sorted(floats)}
    return alloc.bits, {"budget_avg_bits": round(wanted, 4), **size,
                        "avg_bits": round(alloc.avg_bits, 3),
                        "budget_met": alloc.avg_bits <= wanted + 1e-9,
                        "cheapest_avg_bits": round(cheapest, 3),
                        "metrics": mp.metrics if img_t else ["output"],
                        "image_estimate": estimate if img_t else None,
                        **({"image_metric": "not measured: no pipeline and no sample_fn to "
                            "sample the module"} if "image" in mp.metrics and not img_t else {}),
                        "kept_full_precision": kept, "table": table}
