"""torchao and NVIDIA ModelOpt as peers, on the layers our ptq pass targets.

torchao 0.18 (``quantize_`` with a filter on those layers): int8 dynamic activations + int8
weights (eager, and with ``torch.compile``), int8 weight-only, int4 weight-only in groups of 64
(``IntxWeightOnlyConfig``: on CPU it keeps each 4-bit code in a byte, so it stores 8 bits a
weight), fp8 weight-only. Sizes are what torchao's tensors hold.

ModelOpt 0.47 (``mtq.quantize`` with a ``forward_loop`` over the calibration calls): its
SmoothQuant W8A8, INT8 default (W8A8), INT4 AWQ (groups of 128), W4A8 AWQ and FP8 presets,
their quantizers enabled only on those layers. On CPU ModelOpt fake-quantises: the quality row
is real, the weights stay float, so the size is the format's nominal one (codes + one fp16
scale per group or row) and the latency row is marked simulated.

Each tool is optional (``pip install -e .[peers]``); a peer whose tool is missing fails with one
line and the table goes on without it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from compress.models.base import ModelHandle

Layers = list[tuple[str, torch.nn.Module, str]]


def _need(module: str, dist: str) -> None:
    if importlib.util.find_spec(module) is None:
        from peers import PeerFailed

        raise PeerFailed(f"{dist} is not installed (pip install -e .[peers])")


def _calls(handle: ModelHandle, calib: Any):
    from compress.calib.dataset import replay

    return lambda model: replay(handle, calib, model)


# ----------------------------------------------------------------------------- torchao


def _torchao_config(kind: str):
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup

    return {"int8-dynamic": Int8DynamicActivationInt8WeightConfig,
            "int8-wo": Int8WeightOnlyConfig,
            "int4-wo-g64": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                        granularity=PerGroup(64)),
            "fp8-wo": Float8WeightOnlyConfig}[kind]()


def torchao(kind: str, compiled: bool = False):
    def apply(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
        _need("torchao", "torchao")
        from torchao.quantization import quantize_

        names = {n for n, _, _ in layers}
        out: dict[str, Any] = {"config": kind}
        if kind == "int4-wo-g64":  # torchao needs whole groups: 32 where 64 does not divide
            from torchao.quantization import IntxWeightOnlyConfig
            from torchao.quantization.granularity import PerGroup

            narrow = {n for n, m, _ in layers if m.in_features % 64}
            names -= narrow
            width = {k: m.in_features for k, m, _ in layers}
            g32 = {n for n in narrow if width[n] % 32 == 0}
            quantize_(handle.transformer, IntxWeightOnlyConfig(
                weight_dtype=torch.int4, granularity=PerGroup(32)),
                filter_fn=lambda m, fqn: fqn in g32)
            out["groups_of_32"] = sorted(g32)
            out["left_float"] = sorted(narrow - g32)
        quantize_(handle.transformer, _torchao_config(kind),
                  filter_fn=lambda m, fqn: fqn in names)
        if compiled:
            handle.transformer.compile()
            out["compiled"] = "nn.Module.compile() (torch.compile, default mode)"
        return out
    return apply


# ----------------------------------------------------------------------------- ModelOpt

# nominal stored bits per quantised weight (codes + one fp16 scale per group / row)
_MO_BITS = {"INT8_SMOOTHQUANT_CFG": (8, None), "INT8_DEFAULT_CFG": (8, None),
            "INT4_AWQ_CFG": (4, 128), "W4A8_AWQ_BETA_CFG": (4, 128), "FP8_DEFAULT_CFG": (8, None)}


def _restricted(preset: dict, names: set[str]) -> dict:
    """The preset with its weight / input quantizers enabled on ``names`` only."""
    cfg = dict(preset)
    entries = []
    for e in preset["quant_cfg"]:
        pat = e.get("quantizer_name")
        if pat in ("*weight_quantizer", "*input_quantizer") and "cfg" in e:
            entries += [{**e, "quantizer_name": f"{n}.{pat[1:]}"} for n in sorted(names)]
        elif pat in ("*weight_quantizer", "*input_quantizer"):
            continue  # disabled everywhere by the leading "*" entry anyway
        else:
            entries.append(e)
    cfg["quant_cfg"] = entries
    return cfg


def modelopt(preset_name: str):
    def apply(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
        _need("modelopt", "nvidia-modelopt")
        import modelopt.torch.quantization as mtq

        names = {n for n, _, _ in layers}
        preset = getattr(mtq, preset_name)
        tr = mtq.quantize(handle.transformer, _restricted(preset, names),
                          forward_loop=_calls(handle, calib))
        handle.transformer = tr
        bits, group = _MO_BITS[preset_name]
        weights = sum(m.weight.numel() for _, m, _ in layers)
        scales = sum(m.weight.numel() // group if group else m.weight.shape[0]
                     for _, m, _ in layers)
        enabled = sum(1 for n, m in tr.named_modules()
                      if n in names and getattr(getattr(m, "weight_quantizer", None),
                                                "is_enabled", False))
        return {"preset": preset_name, "algorithm": str(preset.get("algorithm")),
                "layers_with_quantizers": enabled, "fake_quantised": True,
                "_nominal_quantised_bytes": weights * bits // 8 + 2 * scales,
                "_simulated_speed": True}
    return apply


def peers(make) -> dict[str, Any]:
    """The peer specs, built with ``make(description, apply, tool, settings)``."""
    ao = {
        "torchao-int8-dynamic": ("int8-dynamic", False, (
            "int8 weights per channel + int8 dynamic per-token activations "
            "(Int8DynamicActivationInt8WeightConfig), eager")),
        "torchao-int8-dynamic-compiled": ("int8-dynamic", True, (
            "as torchao-int8-dynamic, the transformer compiled with torch.compile")),
        "torchao-int8-wo": ("int8-wo", False, "int8 weight-only per channel (Int8WeightOnlyConfig)"),
        "torchao-int4-wo-g64": ("int4-wo-g64", False, (
            "int4 weight-only in groups of 64 (IntxWeightOnlyConfig; on CPU each code takes a "
            "byte)")),
        "torchao-fp8-wo": ("fp8-wo", False, "fp8 e4m3 weight-only (Float8WeightOnlyConfig)"),
    }
    out = {name: make(f"torchao 0.18 {desc}", torchao(kind, comp), "torchao",
                      {"config": kind, "compiled": comp})
           for name, (kind, comp, desc) in ao.items()}
    mo = {
        "modelopt-int8-sq": ("INT8_SMOOTHQUANT_CFG", "SmoothQuant W8A8"),
        "modelopt-int8": ("INT8_DEFAULT_CFG", "INT8 default (W8A8, max calibration)"),
        "modelopt-int4-awq": ("INT4_AWQ_CFG", "INT4 AWQ weight-only (groups of 128)"),
        "modelopt-w4a8-awq": ("W4A8_AWQ_BETA_CFG", "W4A8 AWQ (int4 weights, fp8 activations)"),
        "modelopt-fp8": ("FP8_DEFAULT_CFG", "FP8 weights and activations"),
    }
    out.update({name: make(f"NVIDIA ModelOpt 0.47 {desc}, calibrated on the captured inputs; "
                           "fake-quantised on CPU (nominal size, simulated speed)",
                           modelopt(preset), "nvidia-modelopt", {"preset": preset})
                for name, (preset, desc) in mo.items()})
    return out
