"""Time one denoising step of a PixArt-alpha-XL-shaped transformer in many precisions.

Random weights, batch 2 (one prompt with classifier-free guidance), 256 image tokens
(sample_size 32, patch 2, 4 latent channels), 120 text tokens of 4096 channels, 28 blocks of
width 1152 (16 heads x 72). Quantised variants swap the nn.Linear layers inside the
transformer blocks (self-attention, cross-attention, feed-forward); everything else stays in
bf16.

"ours-*" rows run attention as a loaded output does (compress/modules/attention.py: the matmul
form at the shapes where it times faster than torch's fused kernel; the row
"bf16-matmul-attention" is the original with the same choice, which is what of ours' gain is
that kernel and not the bits; "ours-w8a8-dynamic-sdpa" is ours with torch's kernel).

Timing: every variant is timed in alternation with the eager bf16 model kept in memory, and
its "vs bf16" figure is the median of the per-pair ratios, so it compares runs made under the
same machine load (other jobs on the box move absolute times a lot; paired ratios move much
less). "vs fp32" divides by the fp32 row's median.

    python eval/bench_speed.py                     # everything, all cores
    python eval/bench_speed.py --quick             # 2 blocks, fewer runs: a smoke test
    python eval/bench_speed.py --only bf16,ours-w8a8-static --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compress.modules import attention
from compress.modules.int4 import Int4Linear
from compress.modules.qlinear import QLinear
from compress.modules.w8a8 import (
    W8A8Linear,
    clear_input_cache,
    fuse_feedforwards,
)
from compress.quant import kernels

BLOCKS_KEY = "transformer_blocks."

# The reference figures the issue reports for this machine (all cores, 28 blocks).
ISSUE_MS = {
    "fp32": 2450, "bf16": 761, "bf16-compile-freeze": 483, "quanto-w8a8": 1382, "quanto-w4": 3939,
}


def build_model(blocks: int) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        sample_size=32, num_layers=blocks, in_channels=4, out_channels=8,
        num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152,
        caption_channels=4096, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()


def make_inputs(dtype: torch.dtype) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 4, 32, 32, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(2, 120, 4096, generator=g).to(dtype),
        "timestep": torch.tensor([500, 500]),
        "return_dict": False,
    }


def block_linears(model: nn.Module) -> list[str]:
    return [
        n for n, m in model.named_modules()
        if n.startswith(BLOCKS_KEY) and isinstance(m, nn.Linear)
    ]


def swap(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module]) -> nn.Module:
    for name in block_linears(model):
        parent, _, child = name.rpartition(".")
        p = model.get_submodule(parent)
        setattr(p, child, make(name, getattr(p, child)))
    return model


@torch.no_grad()
def input_absmax(model: nn.Module, inputs: dict[str, Any]) -> dict[str, float]:
    """Per block Linear, the abs-max of its input over one step (static calibration)."""
    amax: dict[str, float] = {}
    hooks = []
    for name in block_linears(model):
        def hook(m: nn.Module, args: tuple, name: str = name) -> None:
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().max()))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    model(**inputs)
    for h in hooks:
        h.remove()
    return amax


# ---------------------------------------------------------------------------------------------
# variants: name -> builder(fp32 master, bf16 model, inputs) -> (callable model, inputs)


def _bf16(master: nn.Module) -> nn.Module:
    return copy.deepcopy(master).to(torch.bfloat16)


def v_fp32(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return master


def v_bf16(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return bf16


def _compiled(model: nn.Module, freeze: bool) -> nn.Module:
    torch._dynamo.reset()
    torch._inductor.config.freezing = freeze
    return torch.compile(model)


def v_bf16_compile(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _compiled(_bf16(master), freeze=False)


def v_bf16_compile_freeze(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _compiled(_bf16(master), freeze=True)


def _quanto(master: nn.Module, weights: str, activations: str | None) -> nn.Module:
    from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

    qt = {"qint8": qint8, "qint4": qint4}
    model = _bf16(master)
    quantize(
        model, weights=qt[weights], activations=qt[activations] if activations else None,
        include=block_linears(model),
    )
    if activations:
        with torch.no_grad(), Calibration(streamline=False):
            model(**make_inputs(torch.bfloat16))
    freeze(model)
    return model


def v_quanto_w8a8(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _quanto(master, "qint8", "qint8")


def v_quanto_w4(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _quanto(master, "qint4", None)


def v_quanto_w8(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _quanto(master, "qint8", None)


def _torchao(master: nn.Module, kind: str, compiled: bool = False) -> nn.Module:
    """torchao 0.18's quantize_ on the block Linears of the bf16 model (see eval/peer_ao.py)."""
    from peer_ao import _torchao_config
    from torchao.quantization import quantize_

    model = _bf16(master)
    names = set(block_linears(model))
    quantize_(model, _torchao_config(kind), filter_fn=lambda m, fqn: fqn in names)
    return _compiled(model, freeze=False) if compiled else model


def v_torchao_int8_dynamic(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _torchao(master, "int8-dynamic")


def v_torchao_int8_dynamic_compile(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _torchao(master, "int8-dynamic", compiled=True)


def v_torchao_int8_wo(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _torchao(master, "int8-wo")


def v_torchao_int4_wo(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _torchao(master, "int4-wo-g64")


def v_torchao_fp8_wo(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _torchao(master, "fp8-wo")


def _ours_w8a8(master: nn.Module, act: str, fuse: bool = True) -> nn.Module:
    model = _bf16(master)
    scales: dict[str, float] = {}
    if act == "static":
        scales = {k: v / 127.0 for k, v in input_absmax(model, make_inputs(torch.bfloat16)).items()}
    swap(model, lambda n, lin: W8A8Linear.from_linear(
        lin, act=act, act_scale=scales.get(n) if act == "static" else None))
    if fuse:
        fuse_feedforwards(model)
    return model


def v_ours_w8a8_dynamic(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _ours_w8a8(master, "dynamic")


def v_ours_w8a8_static(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _ours_w8a8(master, "static")


def v_ours_w8a8_dynamic_sdpa(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _ours_w8a8(master, "dynamic")  # not enabled below: torch's attention kernel


def v_bf16_matmul_attention(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return attention.enable(_bf16(master))


def v_ours_w8a8_dynamic_unfused(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _ours_w8a8(master, "dynamic", fuse=False)


def v_ours_w8a8_static_unfused(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _ours_w8a8(master, "static", fuse=False)


def v_ours_w8a8_static_compile(master: nn.Module, bf16: nn.Module) -> nn.Module:
    model = _ours_w8a8(master, "static")
    for m in model.modules():
        if isinstance(m, W8A8Linear):
            m.prepare()  # the packed weight must exist before tracing (freezing folds it in)
    return _compiled(attention.enable(model), freeze=True)


def _with_lora(model: nn.Module, names: list[str], rank: int = 16) -> nn.Module:
    """A rank-``rank`` LoRA on every attention and feed-forward Linear of the blocks, as a bf16
    side branch (compress.lora's layer beside our compressed layers, PEFT's beside nn.Linear)."""
    from peft import LoraConfig, inject_adapter_in_model

    from compress.lora.layer import install

    install()
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names,
                                       init_lora_weights=False), model)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(torch.bfloat16)
    return model


def v_bf16_lora16(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _with_lora(_bf16(master), block_linears(master))


def v_ours_w8a8_dynamic_lora16(master: nn.Module, bf16: nn.Module) -> nn.Module:
    model = _ours_w8a8(master, "dynamic")
    for m in model.modules():
        if isinstance(m, W8A8Linear):
            m.prepare()
    return _with_lora(model, block_linears(master))


def _ours_w8a8_compiled(master: nn.Module, attn: bool) -> nn.Module:
    model = _ours_w8a8(master, "dynamic")
    for m in model.modules():
        if isinstance(m, W8A8Linear):
            m.prepare()
    if attn:  # before compiling: the trace then holds dit_compress::attention
        attention.enable(model)
    return _compiled(model, freeze=True)


def v_ours_w8a8_dynamic_compile(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _ours_w8a8_compiled(master, attn=True)


def v_ours_w8a8_dynamic_compile_sdpa(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _ours_w8a8_compiled(master, attn=False)


def v_ours_int4(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return swap(_bf16(master), lambda n, lin: Int4Linear.from_linear(lin, ARGS.int4_group))


def v_ours_w8(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return swap(_bf16(master), lambda n, lin: QLinear.from_linear(lin, bits=8))


def _ours_vq(master: nn.Module, dim: int, k: int) -> nn.Module:
    """VQLinear on every block Linear. Codebooks and indices are random (speed does not depend
    on their values; k-means on 28 blocks of XL weights would only lengthen the setup)."""
    from compress.modules.vq_linear import VQLinear

    g = torch.Generator().manual_seed(0)

    def make(_n: str, lin: nn.Linear) -> nn.Module:
        books = torch.randn(1, k, dim, generator=g) * 0.02
        idx = torch.randint(0, k, (lin.out_features, lin.in_features // dim), generator=g)
        return VQLinear.from_assignment(books, idx, lin.bias, None)

    return swap(_bf16(master), make)


def v_ours_vq2(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _ours_vq(master, 4, 256)


def v_ours_vq3(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _ours_vq(master, 2, 64)


def _ours_width(master: nn.Module, sparsity: float) -> nn.Module:
    """bf16 with ``sparsity`` of the blocks' parameters removed by prune_width's uniform
    selection (heads first, then feed-forward channels to multiples of 8); which elements go
    does not matter for speed, so the scores are random."""
    from compress.models import adapter_for
    from compress.models.width import remove, units
    from compress.prune.width_gates import element_cost
    from compress.prune.width_scores import random_scores
    from compress.prune.width_select import choose

    m = copy.deepcopy(master)
    ad = adapter_for(m)
    found = units(m, ad)
    costs = {u.name: element_cost(m, u) for u in found}
    total = sum(p.numel() for _, b in ad.blocks(m) for p in b.parameters())
    keep = choose(found, random_scores(found, 0), costs, target=round(sparsity * total),
                  multiple=8)
    remove(m, ad, keep)
    return m.to(torch.bfloat16)


def v_ours_width30(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _ours_width(master, 0.3)


def _ours_moe(master: nn.Module, experts: int, top_k: int, shared: float) -> nn.Module:
    """bf16 with every feed-forward converted by to_moe's surgery: a shared expert of
    ``shared`` of the channels and ``experts`` routed experts, ``top_k`` per token. Weights are
    random, so the split is random and the router a small random matrix (its top-k choices
    spread the tokens about evenly over the experts, as a trained, balanced router does)."""
    from compress.models import adapter_for
    from compress.models.width import units
    from compress.moe import convert, split

    m = copy.deepcopy(master)
    gen = torch.Generator().manual_seed(0)
    for u in units(m, adapter_for(m)):
        if u.kind != "channels":
            continue
        spec = convert.spec_of(m, u)
        scores = torch.rand(u.count, generator=gen)
        shared_idx, groups = split.assign("random", scores, torch.zeros(u.count, 1), None,
                                          round(shared * u.count), experts, 0)
        dim = spec["ins"][0]["dim"]
        router = (torch.randn(experts, dim, generator=gen) * 0.02, torch.zeros(experts))
        convert.convert(m, spec, shared_idx, groups, top_k, False, router, None)
    return m.to(torch.bfloat16)


def v_ours_moe(master: nn.Module, bf16: nn.Module) -> nn.Module:
    return _ours_moe(master, 8, 2, 0.25)


def weight_mb(model: nn.Module) -> float:
    """Resident bytes of the model's parameters and buffers, plus cached unpacked VQ indices."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers(),
              *(m._unpacked for m in model.modules() if getattr(m, "_unpacked", None) is not None)]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 2**20


VARIANTS: dict[str, tuple[Callable[[nn.Module, nn.Module], nn.Module], str]] = {
    "fp32": (v_fp32, "fp32 eager"),
    "bf16": (v_bf16, "bf16 eager"),
    "bf16-compile": (v_bf16_compile, "bf16, torch.compile (default mode)"),
    "bf16-compile-freeze": (v_bf16_compile_freeze, "bf16, torch.compile + inductor freezing"),
    "quanto-w8a8": (v_quanto_w8a8, "optimum-quanto qint8 W + qint8 A (calibrated)"),
    "quanto-w4": (v_quanto_w4, "optimum-quanto qint4 weights"),
    "quanto-w8": (v_quanto_w8, "optimum-quanto qint8 weights"),
    "torchao-int8-dynamic": (v_torchao_int8_dynamic, "torchao Int8DynamicActivationInt8Weight"),
    "torchao-int8-dynamic-compile": (v_torchao_int8_dynamic_compile,
                                     "torchao int8 dynamic, torch.compile (default mode)"),
    "torchao-int8-wo": (v_torchao_int8_wo, "torchao Int8WeightOnly"),
    "torchao-int4-wo": (v_torchao_int4_wo, "torchao IntxWeightOnly int4, groups of 64"),
    "torchao-fp8-wo": (v_torchao_fp8_wo, "torchao Float8WeightOnly"),
    "ours-w8a8-dynamic": (v_ours_w8a8_dynamic, "W8A8Linear, per-token dynamic activations"),
    "ours-w8a8-dynamic-sdpa": (v_ours_w8a8_dynamic_sdpa, (
        "ours-w8a8-dynamic with torch's fused attention kernel everywhere")),
    "bf16-matmul-attention": (v_bf16_matmul_attention, (
        "bf16 eager with ours' attention choice (the kernel's share of ours' gain)")),
    "ours-w8a8-static": (v_ours_w8a8_static, "W8A8Linear, static per-tensor activations"),
    "ours-w8a8-dynamic-unfused": (
        v_ours_w8a8_dynamic_unfused, "as ours-w8a8-dynamic without the feed-forward fusion"),
    "ours-w8a8-static-unfused": (
        v_ours_w8a8_static_unfused, "as ours-w8a8-static without the feed-forward fusion"),
    "ours-w8a8-dynamic-compile": (
        v_ours_w8a8_dynamic_compile, "W8A8Linear dynamic (the recipes' mode), torch.compile + freezing"),
    "ours-w8a8-dynamic-compile-sdpa": (
        v_ours_w8a8_dynamic_compile_sdpa, "ours-w8a8-dynamic-compile with torch's fused attention"),
    "ours-w8a8-static-compile": (
        v_ours_w8a8_static_compile, "W8A8Linear static, torch.compile + freezing"),
    "bf16-lora16": (v_bf16_lora16, "bf16 eager + a rank-16 LoRA on every block Linear (PEFT)"),
    "ours-w8a8-dynamic-lora16": (v_ours_w8a8_dynamic_lora16, (
        "ours-w8a8-dynamic + a rank-16 bf16 LoRA side branch on every block Linear")),
    "ours-int4": (v_ours_int4, "Int4Linear weight-only (group 128)"),
    "ours-width30": (v_ours_width30, ("bf16, 30% of the blocks' parameters removed as heads "
                                      "and feed-forward channels (uniform selection)")),
    "ours-moe": (v_ours_moe, ("bf16, every feed-forward as MoE: 8 experts, top 2, plus a "
                              "shared expert of 25% of the channels (to_moe's runtime)")),
    "ours-w8": (v_ours_w8, "QLinear int8 weight-only (dequantise per call)"),
    "ours-vq2": (v_ours_vq2, "VQLinear 2 bits (d=4, 256 codewords), weight rebuilt per call"),
    "ours-vq3": (v_ours_vq3, "VQLinear 3 bits (d=2, 64 codewords), weight rebuilt per call"),
}


# ---------------------------------------------------------------------------------------------
# timing


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _step(model: nn.Module, inputs: dict[str, Any]) -> float:
    clear_input_cache()
    clock = time.process_time if ARGS.clock == "cpu" else time.perf_counter
    t = clock()
    model(**inputs)
    return (clock() - t) * 1000.0


@torch.no_grad()
def time_variant(
    model: nn.Module, bf16: nn.Module | None, inputs: dict[str, Any], runs: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Alternate variant and bf16 steps; returns both lists of ms."""
    bf_in = make_inputs(torch.bfloat16)
    for _ in range(warmup):
        model(**inputs)
    ours: list[float] = []
    ref: list[float] = []
    for _ in range(runs):
        ours.append(_step(model, inputs))
        if bf16 is not None:
            ref.append(_step(bf16, bf_in))
    return ours, ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 blocks and 3 runs (smoke test)")
    ap.add_argument("--only", default="", help="comma-separated variant names: " + ", ".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--blocks", type=int, default=None, help="override the block count (28)")
    ap.add_argument("--runs", type=int, default=None, help="timed steps per variant (default 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--int4-group", type=int, default=128)
    ap.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="cpu: this process's CPU time (with --threads 1 it ignores time spent preempted by "
        "other jobs; with more threads it counts OpenMP spin-waits too)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--pair-with", default="bf16", metavar="VARIANT",
                    help="the variant every row alternates with and is divided by (default "
                    "bf16; e.g. ours-w8a8-dynamic to time what a LoRA adds to it)")
    global ARGS
    ARGS = args = ap.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(VARIANTS)
    unknown = [n for n in [*names, args.pair_with] if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variant(s) {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    blocks = args.blocks or (2 if args.quick else 28)
    runs = args.runs or (3 if args.quick else 5)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# PixArt-alpha-XL shapes, {blocks} blocks, batch 2, 256+120 tokens; "
          f"threads={args.threads}, load avg {load:.1f}; {runs} runs after {args.warmup} warmup; "
          f"{args.clock} clock")
    print(f"# kernels: {json.dumps(kernels.describe())}")

    with _quiet():
        master = build_model(blocks)
        bf16 = _bf16(master)
        partner = bf16 if args.pair_with == "bf16" else VARIANTS[args.pair_with][0](master, bf16)
        if args.pair_with.startswith("ours-") and not args.pair_with.endswith("-sdpa"):
            attention.enable(partner)
    pw = args.pair_with
    rows: list[dict[str, Any]] = []
    fp32_ms: float | None = None
    for name in names:
        builder, desc = VARIANTS[name]
        t0 = time.perf_counter()
        try:
            with _quiet():
                model = builder(master, bf16)
            if (name.startswith("ours-") and not name.endswith("-sdpa")
                    and not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)):
                attention.enable(model)  # as compress.load_* do (compiled ones: before compiling)
        except ImportError as exc:  # an optional peer tool that is not installed
            print(f"  {name:26s} skipped: {exc} (pip install -e .[peers])", flush=True)
            continue
        with _quiet():
            inputs = make_inputs(torch.float32 if name == "fp32" else torch.bfloat16)
            paired = name != pw
            ours, ref = time_variant(model, partner if paired else None, inputs, runs, args.warmup)
        ms = statistics.median(ours)
        bf_ms = statistics.median(ref) if ref else ms
        # Median of per-pair ratios: each pair ran back to back, so slow drifts in machine load
        # cancel out of it better than out of a ratio of medians.
        vs_bf16 = statistics.median(o / r for o, r in zip(ours, ref)) if ref else 1.0
        if name == "fp32":
            fp32_ms = ms
        rows.append({
            "name": name, "desc": desc, "ms": ms, "bf16_ms_same_session": bf_ms,
            "vs_bf16": vs_bf16, "vs_fp32": (ms / fp32_ms) if fp32_ms else None,
            "runs_ms": [round(v, 1) for v in ours], "setup_s": time.perf_counter() - t0,
            "weights_mb": weight_mb(model),
        })
        print(f"  {name:26s} {ms:9.1f} ms  ({pw} alongside {bf_ms:8.1f} ms, "
              f"paired ratio {vs_bf16:.2f}) weights {rows[-1]['weights_mb']:.0f} MB "
              f"setup {rows[-1]['setup_s']:.0f}s", flush=True)
        if model is not master and model is not bf16 and model is not partner:
            del model
        torch._dynamo.reset()
        torch._inductor.config.freezing = False
        gc.collect()

    print()
    print(f"# attention: {json.dumps(attention.choices())}")
    print(f"| variant | ms/step | vs fp32 | vs {pw} (paired) | weights MB | issue's figure |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        vf = f"{r['vs_fp32']:.2f}x" if r["vs_fp32"] else "-"
        issue = ISSUE_MS.get(r["name"])
        print(f"| {r['name']} | {r['ms']:.0f} | {vf} | {r['vs_bf16']:.2f}x | "
              f"{r['weights_mb']:.0f} | "
              f"{issue if issue and blocks == 28 else '-'} |")
    if args.json:
        args.json.write_text(json.dumps({"blocks": blocks, "threads": args.threads, "paired_with": pw,
                                         "load": load, "rows": rows}, indent=2))
    return 0


ARGS: argparse.Namespace


if __name__ == "__main__":
    sys.exit(main())
