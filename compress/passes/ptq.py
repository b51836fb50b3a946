"""ptq: post-training quantisation of the transformer's Linear and Conv2d layers.

Weights: int8/6/4/3/2 per output channel or grouped, symmetric or asymmetric, round-to-nearest
or GPTQ (block by block, each block calibrated on inputs that already carry the earlier blocks'
quantisation); or fp8 e4m3 with a scale per output channel. Conv2d layers (patch embedders,
conv feed-forwards) and the auxiliary layers (embedders, adaLN, the final projection) are
always weight-only. Activations (optional): int8 on the int8 GEMM, per token (dynamic) or per
tensor (static, with separate scales per group of denoising steps); int4 with a 16-bit
low-rank branch (SVDQuant-style). Outliers: SmoothQuant channel balancing with a searched
strength, folded into the weights. Mixed precision: per-layer sensitivity (output error and
image PSNR) and a bit allocation under an average-bits budget.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import BeforeValidator, Field, field_validator, model_validator
from torch import nn
from tqdm.auto import tqdm

from compress.config import MAX_COUNT, MAX_STEPS, StrictModel, check_selectors, unique
from compress.errors import UserError
from compress.modules.swap import set_submodule
from compress.quant import qtensor
from compress.quant.qtensor import sqnr_db
from compress.registry import PassDef, PassResult, register_pass
from compress.targets import resolve, select

DEFAULT_INCLUDE = ["attn_qkv", "attn_out", "cross_attn", "ff_in", "ff_out"]
def _whole(v):
    # Literal alone takes 8.0 and True; pydantic turns ValueError (not TypeError) into its error
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"bits must be a whole number such as 4 or 8, not {v!r}")  # noqa: TRY004
    return v


Bits = Annotated[Literal[2, 3, 4, 5, 6, 8], BeforeValidator(_whole)]
Format = Literal["int", "fp8_e4m3"]
# Roles that stay weight-only (float activations) even when activations are quantised, and that
# mixed precision may keep in 16 bits: embedders, adaLN modulation, the final projection.
AUX_ROLES = ("embed", "adaln", "proj_out")
LAYER_TYPES = (nn.Linear, nn.Conv2d)


Strict = StrictModel  # unknown keys refused, numbers finite, no coercion across types


def _check_fp8(fmt: str | None, bits: int | None, granularity: str | None,
               symmetric: bool | None) -> None:
    if fmt != "fp8_e4m3":
        return
    if not qtensor.fp8_available():
        raise ValueError(f"format fp8_e4m3 needs torch >= 2.1 (float8_e4m3fn); this is "
                         f"torch {torch.__version__}: use format: int")
    if bits not in (None, 8) or granularity == "group" or symmetric is False:
        raise ValueError("format fp8_e4m3 stores 8-bit floats with one scale per output channel: "
                         "drop bits/granularity/symmetric (or use bits: 8, granularity: channel)")


class WeightSpec(Strict):
    """How weights are quantised."""

    format: Format = Field(
        "int", description="int: integer codes of `bits`; fp8_e4m3: float8 weights, one scale "
        "per output channel (weight-only)"
    )
    bits: Bits = Field(8, description="integer bits per weight")
    granularity: Literal["channel", "group"] = Field(
        "channel", description="one scale per output channel, or per group of inputs"
    )
    group_size: int = Field(64, ge=8, le=8192, multiple_of=8,
                            description="inputs per scale when granularity=group")
    symmetric: bool = Field(True, description="symmetric codes (no zero point)")

    def group(self) -> int | None:
        return self.group_size if self.granularity == "group" else None

    @model_validator(mode="after")
    def _fp8(self) -> WeightSpec:
        _check_fp8(self.format, self.bits, self.granularity, self.symmetric)
        return self


class LayerOverride(Strict):
    """Per-layer changes to the default WeightSpec; skip=true keeps the layer in full precision."""

    skip: bool = False
    format: Format | None = None
    bits: Bits | None = None
    granularity: Literal["channel", "group"] | None = None
    group_size: int | None = Field(None, ge=8, le=8192, multiple_of=8)
    symmetric: bool | None = None

    @model_validator(mode="after")
    def _fp8(self) -> LayerOverride:
        _check_fp8(self.format, self.bits, self.granularity, self.symmetric)
        return self


class ActSpec(Strict):
    """Activation quantisation."""

    bits: Annotated[Literal[4, 8], BeforeValidator(_whole)] = 8
    mode: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: per-token scales at run time; static: calibrated"
    )
    timestep_groups: int = Field(1, ge=1, le=MAX_STEPS,
                                 description="static only: scale sets per step group")


class SmoothSpec(Strict):
    """SmoothQuant-style channel balancing, folded into the weights."""

    alpha: float | Literal["auto"] = Field("auto", description="migration strength in [0, 1], or auto")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"alpha {v}: a migration strength in [0, 1], or auto")
        return v


class GPTQSpec(Strict):
    damp: float = Field(0.01, gt=0, le=1, description="Hessian dampening, fraction of mean diagonal")
    block: int = Field(128, ge=8, le=8192, description="columns processed at once")
    act_order: bool = False


class LowRankSpec(Strict):
    rank: int = Field(32, ge=1, le=4096, description="rank of the 16-bit branch")


class MixedSpec(Strict):
    """Mixed precision: choose bits per layer under a budget."""

    candidates: list[Bits] = Field(default_factory=lambda: [4, 8], min_length=1)
    avg_bits: float | None = Field(None, gt=1, le=16, description="budget: stored bits a "
                                   "weight, over the layers (4.5 when neither it nor size_of is "
                                   "given)")
    size_of: Literal["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"] | None = Field(
        None, description="budget instead of avg_bits: the GGUF file of the model this pass "
        "receives written at this one type (export-gguf --type), tensor bytes; layers that "
        "GGUF keeps float (input width not a multiple of 32) count as float")
    metrics: list[Literal["output", "image"]] = Field(default_factory=lambda: ["output", "image"],
                                                      min_length=1)
    keep_high: list[str] = Field(default_factory=list, description="selectors forced to max bits")
    image_prompts: int = Field(2, ge=1, le=1000)
    image_steps: int = Field(8, ge=1, le=MAX_STEPS)
    image_estimate: Literal["measure", "first_order"] = Field(
        "first_order", description="measure: sample once per layer and candidate; first_order: "
        "estimate every layer's effect on the final latent from image_probes backward passes "
        "through the sampler (pipelines; a module's sampler is always measured)")
    image_probes: int = Field(8, ge=1, le=1000, description="first_order: Gaussian probes "
                              "(backward passes per prompt)")
    if_unreachable: Literal["refuse", "cheapest"] = Field(
        "refuse", description="a budget below the model's cheapest allocation (per-row scales "
        "on narrow layers): refuse, or take the cheapest and report budget_met: false")

    @model_validator(mode="after")
    def _budget(self) -> MixedSpec:
        unique(self.candidates, "candidates")
        unique(self.metrics, "metrics")
        check_selectors(self.keep_high, "keep_high")
        if self.size_of is not None and self.avg_bits is not None:
            raise ValueError("give the budget as avg_bits or as size_of, not both")
        if self.size_of is None and self.avg_bits is None:
            self.avg_bits = 4.5
        if self.size_of is None and self.avg_bits < min(self.candidates):
            raise ValueError(f"avg_bits {self.avg_bits} is below the smallest candidate "
                             f"({min(self.candidates)} bits): no allocation can meet it")
        return self


class Config(Strict):
    """ptq pass configuration."""

    weights: WeightSpec = Field(default_factory=WeightSpec)
    activations: ActSpec | None = None
    smoothing: SmoothSpec | None = None
    gptq: GPTQSpec | None = None
    lowrank: LowRankSpec | None = None
    mixed_precision: MixedSpec | None = None
    calib_samples: int = Field(16, ge=1, le=MAX_COUNT,
                               description="calibration samples used per block")
    include: list[str] = Field(
        default_factory=lambda: list(DEFAULT_INCLUDE), min_length=1,
        description="selectors of layers to quantise: roles, exact names or 're:' regexes",
    )
    exclude: list[str] = Field(default_factory=list, description="selectors of layers to keep")
    overrides: dict[str, LayerOverride] = Field(
        default_factory=dict, description="selector -> per-layer changes"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        check_selectors(self.include, "include")
        check_selectors(self.exclude, "exclude")
        check_selectors(list(self.overrides), "overrides")
        a = self.activations
        if a is not None and a.bits == 8 and self.weights.granularity == "group":
            raise ValueError("int8 activations run on the int8 GEMM: use granularity: channel")
        if a is not None and a.bits == 8 and not self.weights.symmetric:
            raise ValueError("int8 activations need symmetric weights")
        if a is not None and a.bits == 4 and self.lowrank is None:
            raise ValueError("4-bit activations need the low-rank branch (lowrank: {rank: ...})")
        if a is not None and a.timestep_groups > 1 and a.mode != "static":
            raise ValueError("timestep_groups needs activations.mode: static")
        if self.lowrank is not None and (a is None or a.bits != 4):
            raise ValueError("lowrank is for W4A4: set activations.bits: 4")
        if self.weights.format == "fp8_e4m3":
            used = [k for k in ("activations", "gptq", "mixed_precision") if getattr(self, k)]
            if used:
                raise ValueError(f"weights.format fp8_e4m3 is weight-only round-to-nearest: drop "
                                 f"{', '.join(used)} (or use fp8 for some layers via overrides)")
        if self.mixed_precision is not None and a is not None and a.bits == 8:
            bad = [b for b in self.mixed_precision.candidates if b not in (4, 8)]
            if bad:
                raise ValueError(f"with int8 activations the candidates are 4 and 8, not {bad}")
        return self


def layer_spec(cfg: Config, name: str, role: str) -> WeightSpec | None:
    ov = resolve(cfg.overrides, name, role)
    if ov is None:
        return cfg.weights
    if ov.skip:
        return None
    data = cfg.weights.model_dump()
    changes = {k: v for k, v in ov.model_dump().items() if v is not None and k != "skip"}
    if changes.get("format") == "fp8_e4m3":  # fp8 has its own layout, whatever the default's
        data.update(bits=8, granularity="channel", symmetric=True)
    data.update(changes)
    return WeightSpec(**data)


def _needs_data(cfg: Config) -> bool:
    return any(x is not None for x in (cfg.activations, cfg.smoothing, cfg.gptq, cfg.lowrank,
                                       cfg.mixed_precision))


def apply(handle, calib, cfg: Config) -> PassResult:
    from compress.modules.w8a8 import TimestepContext, attach_timestep_context

    tr = handle.transformer
    prepare = getattr(handle.adapter, "prepare", None)  # e.g. unfuse nn.MultiheadAttention
    prepared = prepare(tr) if prepare is not None else []
    chosen = select(handle.adapter, tr, cfg.include, cfg.exclude, types=LAYER_TYPES)
    if not chosen:
        raise UserError(f"ptq: no Linear/Conv2d layer matches include={cfg.include} "
                        f"exclude={cfg.exclude}")
    if _needs_data(cfg) and (calib is None or len(calib) == 0):
        raise UserError("ptq: activations/smoothing/gptq/lowrank/mixed_precision need calibration data")
    total_params = sum(p.numel() for p in tr.parameters())
    specs = {n: layer_spec(cfg, n, r) for n, _, r in chosen}
    roles = {n: r for n, _, r in chosen}
    specs = {n: s for n, s in specs.items() if s is not None}
    aux = _auxiliary(handle, chosen)
    act = {n for n, m, _ in chosen if n in specs and n not in aux and isinstance(m, nn.Linear)
           and specs[n].format == "int"} if cfg.activations is not None else set()

    mp_report = None
    if cfg.mixed_precision is not None:
        from compress.passes.ptq_mixed import allocate_bits

        alloc_bits, mp_report = allocate_bits(handle, calib, cfg, specs, roles, aux, act)
        specs = {n: s.model_copy(update={"bits": alloc_bits[n]}) if n in alloc_bits else s
                 for n, s in specs.items() if alloc_bits.get(n, 0) < 16}

    a = cfg.activations
    ctx = None
    if a is not None and a.mode == "static" and a.timestep_groups > 1:
        ctx = TimestepContext.uniform(a.timestep_groups)
        # set before calibration: replaying later blocks runs already-quantised earlier ones
        attach_timestep_context(tr, ctx)

    meta_layers: dict[str, dict] = {}
    rows = []
    from compress.quant.collect import stages

    data = _needs_data(cfg)
    for stage, names in tqdm(stages(handle, list(specs)), desc="ptq", leave=False):
        stats = _collect(handle, calib, cfg, stage, names, ctx) if data else None
        for n in names:
            mod = tr.get_submodule(n)
            new, info, err = _quantize_layer(mod, specs[n], cfg, stats, n, ctx, n in act)
            set_submodule(tr, n, new)
            meta_layers[n] = info
            rows.append({"layer": n, "role": roles[n], "kind": info["kind"],
                         "format": specs[n].format, "bits": specs[n].bits,
                         # a group wider than the layer is one group of its width
                         "group_size": (min(specs[n].group(), info["in"])
                                        if specs[n].group() else None),
                         "act_bits": a.bits if n in act else None, **err})
    meta: dict = {"layers": meta_layers}
    if prepared:
        meta["prepared"] = prepared
    if ctx is not None:
        meta["timestep_context"] = ctx.to_dict()
    used = forward_coverage(handle, calib, list(meta_layers))
    q_params = sum(m["in"] * m["out"] for m in meta_layers.values())
    report = {
        "layers_quantized": len(meta_layers),
        "weights_quantized_fraction": q_params / total_params,
        "weights_quantized_and_used_fraction": (
            None if used is None
            else sum(meta_layers[n]["in"] * meta_layers[n]["out"] for n in used) / total_params
        ),
        "avg_bits_quantized_layers": (
            sum(m["in"] * m["out"] * m["bits"] for m in meta_layers.values()) / max(q_params, 1)
        ),
        "layers": rows,
    }
    if mp_report is not None:
        report["mixed_precision"] = mp_report
    if prepared:
        report["prepared"] = prepared  # modules replaced before selection, old -> new names
    return PassResult(meta=meta, report=report)


def _attach_ctx(tr: nn.Module, ctx) -> None:
    from compress.modules.w8a8 import W8A8Linear, attach_timestep_context

    for m in tr.modules():
        if isinstance(m, W8A8Linear):
            m.context = ctx
    attach_timestep_context(tr, ctx)


def _collect(handle, calib, cfg: Config, stage, names, ctx) -> dict:
    """Run the stage on calibration data with observers on its layers."""
    from compress.quant.collect import RowSampler, run_stage
    from compress.quant.observers import attach

    tr = handle.transformer
    mods = {n: tr.get_submodule(n) for n in names}
    current = {"g": 0}
    group_fn = (lambda: current["g"]) if ctx is not None else None

    def on_sample(t: float) -> None:
        if ctx is not None:
            current["g"] = ctx.group_of(t)

    # Grouped (depthwise) convs have no single input Hessian: rows only, round-to-nearest.
    observed = {n: m for n, m in mods.items() if getattr(m, "groups", 1) == 1}
    obs = attach(observed, group_fn=group_fn, act=True, hessian=cfg.gptq is not None)
    rs = RowSampler(mods, max_rows=256)
    try:
        run_stage(handle, calib, stage, cfg.calib_samples, on_sample)
    finally:
        obs.remove()
        rs.remove()
    return {"obs": obs, "rows": rs}


def _auxiliary(handle, chosen) -> set[str]:
    """Layers that stay weight-only and may stay 16-bit in mixed precision: embedders, adaLN,
    the final projection, and whatever lies outside the blocks (when the model has blocks)."""
    blocks = [b for b, _ in handle.adapter.blocks(handle.transformer)]
    return {n for n, _, r in chosen
            if r in AUX_ROLES or (blocks and not any(n.startswith(b + ".") for b in blocks))}


def _codes(mod: nn.Module, w: torch.Tensor, spec: WeightSpec, cfg: Config, stats, name: str):
    if cfg.gptq is not None and stats is not None and name in stats["obs"].hessian:
        from compress.quant.gptq import gptq_quantize

        h = stats["obs"].hessian[name].mean()
        return gptq_quantize(w, h, spec.bits, spec.group(), spec.symmetric, cfg.gptq.damp,
                             cfg.gptq.block, cfg.gptq.act_order)
    return qtensor.quantize(w, spec.bits, spec.group(), spec.symmetric)


@torch.no_grad()
def _quantize_layer(mod: nn.Module, spec: WeightSpec, cfg: Config, stats, name: str, ctx,
                    act: bool):
    from compress.modules.lowrank_linear import LowRankQLinear
    from compress.modules.w4a8 import W4A8Linear
    from compress.modules.w8a8 import W8A8Linear
    from compress.quant.smooth import fake_quant_act, search_alpha, smooth_scales

    if not act:
        return _weight_only(mod, spec, cfg, stats, name)
    a = cfg.activations
    w = mod.weight.detach().float()
    info = {"in": mod.in_features, "out": mod.out_features, "bias": mod.bias is not None,
            "bits": spec.bits, "group_size": spec.group(), "symmetric": spec.symmetric}
    x = stats["rows"].get(name) if stats is not None else None
    if x is not None:
        x = x.to(w.device)

    if a is not None and a.bits == 4:  # W4A4 + low-rank branch
        from compress.quant.lowrank import svdquant

        quant_res = None
        if cfg.gptq is not None:
            h = stats["obs"].hessian[name].mean()

            def quant_res(r, s):
                from compress.quant.gptq import gptq_quantize

                hs = h if s is None else h / (s[:, None] * s[None, :])
                return gptq_quantize(r, hs, spec.bits, spec.group(), spec.symmetric,
                                     cfg.gptq.damp, cfg.gptq.block)
        alphas = (None, 0.3, 0.5, 0.7) if cfg.smoothing is None or cfg.smoothing.alpha == "auto" \
            else (cfg.smoothing.alpha,)
        lq = svdquant(w, x, cfg.lowrank.rank, spec.bits, 4, spec.group(), spec.symmetric,
                      alphas=alphas, quantize_residual=quant_res)
        new = LowRankQLinear.from_lowrank(lq, mod.bias, spec.group(), 4)
        # the rank actually used: svdquant caps it at min(out, in) on narrow layers
        info.update({"kind": "lowrank", "rank": new.rank, "a_bits": 4,
                     "smooth": lq.s is not None})
        ref = x @ w.T
        y = new(x) - (new.bias if new.bias is not None else 0)
        return new, info, {"output_sqnr_db": round(sqnr_db(ref, y), 2)}

    s = None
    if cfg.smoothing is not None and x is not None:
        absmax = stats["obs"].merged(name).chan_absmax.to(w.device)
        if cfg.smoothing.alpha == "auto":
            _, s = search_alpha(x, w, spec.bits, a.bits if a else None, act_absmax=absmax,
                                alphas=[round(0.1 * i, 1) for i in range(9)])
        else:
            s = smooth_scales(absmax, w, float(cfg.smoothing.alpha))

    if a is not None and a.bits == 8:
        ws = w * s[None, :] if s is not None else w
        codes, scale, _ = qtensor.quantize(ws, spec.bits, None, True) if cfg.gptq is None else \
            _codes(mod, ws, spec, cfg, _rescaled(stats, name, s), name)
        act_scale = None
        if a.mode == "static":
            act_scale = _static_scales(stats, name, s, ctx)
        if spec.bits == 4:
            new = W4A8Linear.from_codes(codes, scale[:, 0], mod.bias, a.mode, act_scale, s)
        else:
            c = (codes.to(torch.int16) - 2 ** (spec.bits - 1)).to(torch.int8)
            new = W8A8Linear.from_int8(c, scale[:, 0].float(), mod.bias, a.mode, act_scale, s)
        if ctx is not None:
            new.context = ctx
        info.update({"kind": "w4a8" if spec.bits == 4 else "w8a8", "act": a.mode,
                     "n_groups": 1 if act_scale is None else int(torch.as_tensor(act_scale).numel()),
                     "smooth": s is not None})
        err = {}
        if x is not None:
            ref = x @ w.T
            xq = x / s if s is not None else x
            xq = fake_quant_act(xq, 8, "token")
            wq = new.dequantized_weight().float()  # in the original basis: smoothing undone
            if s is not None:  # the kernel multiplies x / s by the smoothed weight W * s
                wq = wq * s[None, :].to(wq)
            err["output_sqnr_db"] = round(sqnr_db(ref, xq @ wq.T), 2)
        return new, info, err

    raise AssertionError(f"ptq: no quantiser for activation bits {a.bits}")


@torch.no_grad()
def _weight_only(mod: nn.Module, spec: WeightSpec, cfg: Config, stats, name: str):
    """Linear -> QLinear / Int4Linear / FP8Linear; Conv2d -> QConv2d around one of them."""
    from compress.modules.qconv import QConv2d
    from compress.modules.weight_only import matrix_from_codes, quantize_matrix
    from compress.quant.observers import rows_linear

    conv = isinstance(mod, nn.Conv2d)
    w = mod.weight.detach().float().flatten(1)  # a conv's weight as [out, in/groups * kh * kw]
    bias = None if conv else mod.bias
    info = {"in": w.shape[1], "out": w.shape[0], "bias": mod.bias is not None,
            "bits": spec.bits, "group_size": spec.group(), "symmetric": spec.symmetric}
    err: dict = {}
    if spec.format == "fp8_e4m3":
        mat, kind = quantize_matrix(w, bias, spec.format, 8, None, True)
    else:
        if cfg.gptq is not None:
            gptq = stats is not None and name in stats["obs"].hessian
            err["method"] = "gptq" if gptq else "rtn"  # grouped convs have no single Hessian
        codes, scale, zero = _codes(mod, w, spec, cfg, stats, name)
        mat, kind = matrix_from_codes(codes, scale, zero, spec.bits, spec.group(), bias)
    if conv:
        new = QConv2d.wrap(mod, mat)
        info.update({"kind": "conv", "matrix": kind, **new.geometry()})
    else:
        new = mat
        info["kind"] = kind
    wq = mat.dequantized_weight()
    err["weight_sqnr_db"] = round(sqnr_db(w, wq), 2)
    x = stats["rows"].get(name) if stats is not None else None
    if x is not None:
        x, g = x.to(w.device), getattr(mod, "groups", 1)
        err["output_sqnr_db"] = round(sqnr_db(rows_linear(x, w, g), rows_linear(x, wq, g)), 2)
    return new, info, err


def _rescaled(stats, name: str, s):
    if s is None or stats is None:
        return stats
    h = stats["obs"].hessian[name]
    hs = h.mean() / (s[:, None] * s[None, :])

    class _H:  # the Hessian of the smoothed input x/s
        def mean(self_inner):
            return hs

    obs = type("O", (), {"hessian": {name: _H()}})()
    return {"obs": obs, "rows": stats["rows"]}


def _static_scales(stats, name: str, s, ctx) -> torch.Tensor:
    obs = stats["obs"]
    groups = ctx.n_groups if ctx is not None else 1
    out = []
    merged = obs.merged(name)
    for g in range(groups):
        st = obs.act[name].get(g if ctx is not None else None, merged)
        amax = st.chan_absmax
        if s is not None:
            amax = amax / s.to(amax.device)
        out.append(float(amax.max()) / 127.0)
    return torch.tensor(out).clamp_min(1e-8)


def forward_coverage(handle, calib, names: list[str]) -> list[str] | None:
    """Names of quantised layers that actually ran in one forward pass on a calibration sample.

    A swapped module that a fused fast path bypasses would be missing here.
    """
    if calib is None or len(calib) == 0:
        return None
    tr = handle.transformer
    ran: set[str] = set()
    # Wrap each module's forward on the instance rather than registering hooks: torch's fused
    # TransformerEncoderLayer path switches itself off when any hook is attached, so a hook
    # would measure the slow path that inference never takes.
    mods = {n: tr.get_submodule(n) for n in names}
    saved = {n: m.__dict__.get("forward") for n, m in mods.items()}

    def recording(n: str, fwd):
        def forward(*args, **kwargs):
            ran.add(n)
            return fwd(*args, **kwargs)
        return forward

    for n, m in mods.items():
        m.forward = recording(n, m.forward)
    try:
        s = calib.sample(0)
        with torch.no_grad():
            handle.adapter.call(tr, s.args, s.kwargs)
    finally:
        for n, m in mods.items():
            if saved[n] is None:
                del m.forward
            else:
                m.forward = saved[n]
    return [n for n in names if n in ran]


def restore(transformer: nn.Module, cfg: Config, meta: dict) -> None:
    from compress.modules.lowrank_linear import LowRankQLinear
    from compress.modules.w4a8 import W4A8Linear
    from compress.modules.w8a8 import TimestepContext, W8A8Linear

    if meta.get("prepared"):
        from compress.models.generic import restore_prepared

        restore_prepared(transformer, meta["prepared"])
    for name, m in meta["layers"].items():
        kind = m.get("kind", "weight_only")
        if kind in ("weight_only", "int4", "fp8", "conv"):
            from compress.modules.weight_only import empty_layer

            q = empty_layer(m, device="meta")
        elif kind in ("w8a8", "w4a8"):
            cls = W4A8Linear if kind == "w4a8" else W8A8Linear
            q = cls(m["in"], m["out"], m["bias"], m["act"], m["n_groups"], m["smooth"],
                    device="meta")
        elif kind == "lowrank":
            q = LowRankQLinear(m["in"], m["out"], m["bias"], m["rank"], m["bits"], m["group_size"],
                               m["a_bits"], m["smooth"], device="meta")
        else:
            raise UserError(f"ptq: unknown layer kind {kind!r} in the manifest")
        set_submodule(transformer, name, q)
    if "timestep_context" in meta:
        _attach_ctx(transformer, TimestepContext.from_dict(meta["timestep_context"]))


def check(handle, cfg: Config) -> None:
    """Before any work: every exact name and regex among the selectors names a Linear/Conv2d
    of this model; with known roles (a pipeline), include selects at least one layer."""
    from compress.targets import check_in_model

    mp = cfg.mixed_precision
    check_in_model(handle.transformer, "ptq", LAYER_TYPES, {
        "include": cfg.include, "exclude": cfg.exclude, "overrides": list(cfg.overrides),
        "mixed_precision.keep_high": mp.keep_high if mp else []})
    if handle.pipeline is None:
        return  # a module's roles come from the trace of the first calibration call
    chosen = select(handle.adapter, handle.transformer, cfg.include, cfg.exclude, types=LAYER_TYPES)
    if not chosen:
        raise UserError(f"ptq: no Linear/Conv2d layer matches include={cfg.include} "
                        f"exclude={cfg.exclude}")
    if mp is not None:  # the budget depends on layer shapes and candidates only
        from compress.passes.ptq_mixed import budget_of, candidates_of
        from compress.targets import matches

        specs = {n: layer_spec(cfg, n, r) for n, _, r in chosen}
        mods = {n: m for n, m, _ in chosen if specs[n] is not None and specs[n].format == "int"}
        roles = {n: r for n, _, r in chosen}
        keep = [n for n in mods if any(matches(s, n, roles[n]) for s in mp.keep_high)]
        cands = candidates_of(mp, mods, _auxiliary(handle, chosen))
        budget_of(mp, handle.transformer, mods, specs, cands, keep)


register_pass(PassDef(name="ptq", config=Config, apply=apply, restore=restore, kind="format",
                      needs_calibration=False, check=check))
