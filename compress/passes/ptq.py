"""ptq: post-training quantisation of the transformer's Linear layers.

This file holds the plainest form: round-to-nearest weight-only integers (int8/6/4/3/2), per
output channel or grouped, symmetric or asymmetric, on layers chosen by role, name or regex,
with per-layer overrides (exact name > regex > role > default).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from compress.errors import UserError
from compress.modules.qlinear import QLinear
from compress.modules.swap import set_submodule
from compress.quant.qtensor import sqnr_db
from compress.registry import PassDef, PassResult, register_pass
from compress.targets import resolve, select

DEFAULT_INCLUDE = ["attn_qkv", "attn_out", "cross_attn", "ff_in", "ff_out"]


class WeightSpec(BaseModel):
    """How weights are quantised."""

    model_config = ConfigDict(extra="forbid")
    bits: Literal[2, 3, 4, 6, 8] = Field(8, description="integer bits per weight")
    granularity: Literal["channel", "group"] = Field(
        "channel", description="one scale per output channel, or per group of inputs"
    )
    group_size: int = Field(64, ge=8, description="inputs per scale when granularity=group")
    symmetric: bool = Field(True, description="symmetric codes (no zero point)")

    def group(self) -> int | None:
        return self.group_size if self.granularity == "group" else None


class LayerOverride(BaseModel):
    """Per-layer changes to the default WeightSpec; skip=true keeps the layer in full precision."""

    model_config = ConfigDict(extra="forbid")
    skip: bool = False
    bits: Literal[2, 3, 4, 6, 8] | None = None
    granularity: Literal["channel", "group"] | None = None
    group_size: int | None = Field(None, ge=8)
    symmetric: bool | None = None


class Config(BaseModel):
    """ptq pass configuration."""

    model_config = ConfigDict(extra="forbid")
    weights: WeightSpec = Field(default_factory=WeightSpec)
    include: list[str] = Field(
        default_factory=lambda: list(DEFAULT_INCLUDE),
        description="selectors of layers to quantise: roles, exact names or 're:' regexes",
    )
    exclude: list[str] = Field(default_factory=list, description="selectors of layers to keep")
    overrides: dict[str, LayerOverride] = Field(
        default_factory=dict, description="selector -> per-layer changes"
    )


def layer_spec(cfg: Config, name: str, role: str) -> WeightSpec | None:
    ov = resolve(cfg.overrides, name, role)
    if ov is None:
        return cfg.weights
    if ov.skip:
        return None
    data = cfg.weights.model_dump()
    data.update({k: v for k, v in ov.model_dump().items() if v is not None and k != "skip"})
    return WeightSpec(**data)


def apply(handle, calib, cfg: Config) -> PassResult:
    tr = handle.transformer
    chosen = select(handle.adapter, tr, cfg.include, cfg.exclude)
    # selectors in overrides must exist too
    if not chosen:
        raise UserError(
            f"ptq: no Linear layer matches include={cfg.include} exclude={cfg.exclude}"
        )
    total_params = sum(p.numel() for p in tr.parameters())
    meta_layers: dict[str, dict] = {}
    rows = []
    q_params = 0
    for name, mod, role in tqdm(chosen, desc="ptq", leave=False, disable=len(chosen) < 50):
        spec = layer_spec(cfg, name, role)
        if spec is None:
            continue
        q = QLinear.from_linear(mod, spec.bits, spec.group(), spec.symmetric)
        with torch.no_grad():
            w_sqnr = sqnr_db(mod.weight, q.dequantized_weight())
        set_submodule(tr, name, q)
        q_params += mod.weight.numel()
        meta_layers[name] = {
            "in": mod.in_features, "out": mod.out_features, "bias": mod.bias is not None,
            "bits": spec.bits, "group_size": spec.group(), "symmetric": spec.symmetric,
        }
        rows.append({"layer": name, "role": role, "bits": spec.bits,
                     "group_size": spec.group(), "weight_sqnr_db": round(w_sqnr, 2)})
    used = forward_coverage(handle, calib, list(meta_layers))
    report = {
        "layers_quantized": len(meta_layers),
        "weights_quantized_fraction": q_params / total_params,
        "weights_quantized_and_used_fraction": (
            None if used is None else sum(
                meta_layers[n]["in"] * meta_layers[n]["out"] for n in used
            ) / total_params
        ),
        "layers": rows,
    }
    return PassResult(meta={"layers": meta_layers}, report=report)


def forward_coverage(handle, calib, names: list[str]) -> list[str] | None:
    """Names of quantised layers that actually ran in one forward pass on a calibration sample.

    A swapped module that a fused fast path bypasses would be missing here.
    """
    if calib is None or len(calib) == 0:
        return None
    tr = handle.transformer
    ran: set[str] = set()
    hooks = [
        tr.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: ran.add(n)) for n in names
    ]
    try:
        s = calib.sample(0)
        with torch.no_grad():
            handle.adapter.call(tr, s.args, s.kwargs)
    finally:
        for h in hooks:
            h.remove()
    return [n for n in names if n in ran]


def restore(transformer: nn.Module, cfg: Config, meta: dict) -> None:
    for name, m in meta["layers"].items():
        q = QLinear(m["in"], m["out"], m["bias"], m["bits"], m["group_size"], m["symmetric"],
                    device="meta")
        set_submodule(transformer, name, q)


register_pass(PassDef(name="ptq", config=Config, apply=apply, restore=restore, kind="format",
                      needs_calibration=False))

