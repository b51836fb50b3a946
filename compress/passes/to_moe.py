"""to_moe: dense feed-forwards become mixture-of-experts layers (Dense2MoE-style conversion).

Each feed-forward's hidden channels are split into a shared expert (the ``shared`` fraction of
highest first-order importance, run by every token) and ``experts`` routed experts of equal
width, of which each token runs ``top_k`` (``split``: taylor, kmeans, coactivation or random;
see :mod:`compress.moe.split`). The router starts from a least-squares fit of each expert's
contribution on the calibration tokens (or the split's centroids) and reads the token's hidden
state, optionally with the timestep. Routers and experts then learn with the ``distill`` pass
(output and feature losses plus a load-balancing loss). Runtime: :mod:`compress.modules.moe`.

Feed-forward active parameters per token: shared + routed x top_k / experts of the original's
(plus the router). Works on plain and gated feed-forwards (GELU, GEGLU, SwiGLU), Sana's
GLUMBConv, FLUX's single-block MLP (its proj_out keeps the attention columns dense) and a
user's own module (its feed-forward layers found by the structure inference).
"""

from __future__ import annotations

import re
import time
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.calib.dataset import replay
from compress.config import MAX_COUNT, StrictModel
from compress.errors import UserError
from compress.models import width
from compress.modules import moe
from compress.moe import convert, split
from compress.registry import PassDef, PassResult, register_pass


class Config(StrictModel):
    """to_moe pass configuration."""

    experts: int = Field(8, ge=2, le=256, description="routed experts per feed-forward")
    top_k: int = Field(2, ge=1, le=256, description="routed experts each token runs")
    shared: float = Field(0.25, ge=0, lt=1, description="fraction of the hidden channels in "
                          "the shared expert every token runs (0: none)")
    split: Literal["taylor", "kmeans", "coactivation", "random"] = Field(
        "taylor", description="how routed channels are grouped into experts")
    router_init: Literal["lstsq", "centroid"] = Field(
        "lstsq", description="lstsq: fit each expert's contribution on calibration tokens; "
        "centroid: the experts' mean input weight rows")
    router_timestep: bool = Field(False, description="the router also reads the timestep "
                                  "(sinusoidal features, zero-initialised weights)")
    include: list[str] = Field(default_factory=lambda: ["re:.*"], min_length=1,
                               description="feed-forwards to convert, by module name "
                               "(transformer_blocks.0.ff; a user's MLP written inline in its "
                               "block: BLOCK.ff) or 're:' regex over those names")
    calib_samples: int = Field(16, ge=1, le=MAX_COUNT, description="calibration calls used "
                               "for importance, the split and the router fit")
    max_tokens: int = Field(4096, ge=64, le=1_000_000, description="tokens kept per "
                            "feed-forward for the split and the router fit")
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.top_k > self.experts:
            raise ValueError(f"top_k {self.top_k} is more than experts {self.experts}")
        for sel in self.include:
            if sel.startswith("re:"):
                try:
                    re.compile(sel[3:])
                except re.error as e:
                    raise ValueError(f"include: bad regex {sel!r}: {e}") from None
        return self

    def active_fraction(self) -> float:
        """Feed-forward weights one token runs, as a fraction of the dense layer's."""
        return self.shared + (1 - self.shared) * self.top_k / self.experts


def _selected(name: str, cfg: Config) -> bool:
    return any(re.fullmatch(s[3:], name) if s.startswith("re:") else s == name
               for s in cfg.include)


def _units(handle, cfg: Config) -> list[width.Unit]:
    try:
        found = [u for u in width.units(handle.transformer, handle.adapter, {})
                 if u.kind == "channels"]
    except UserError as e:  # an attention it cannot read heads from: irrelevant here
        if "heads" not in str(e):
            raise
        found = [u for u in width.units(handle.transformer, handle.adapter,
                                        {"re:.*": 1}) if u.kind == "channels"]
    chosen = [u for u in found if _selected(u.name, cfg)]
    if not chosen:
        names = [u.name for u in found]
        raise UserError(f"to_moe: include={cfg.include} selects no feed-forward of this model "
                        f"({len(names)} found: {names[:3]}); name them as listed or use 're:'")
    for u in chosen:
        routed = u.count - round(cfg.shared * u.count)
        if routed < cfg.experts:
            raise UserError(f"to_moe: {u.name} has {u.count} hidden channels, {routed} after the "
                            f"shared expert: fewer than experts={cfg.experts}; lower experts or "
                            "shared")
    return chosen


def _time_argument(handle, cfg: Config) -> tuple[str | None, int | None]:
    arg = moe.timestep_argument(handle.transformer)
    if arg is None and cfg.router_timestep:
        raise UserError("to_moe: router_timestep needs the transformer's forward to take the "
                        "timestep as a parameter named timestep, timesteps, t, time or sigma; "
                        "set router_timestep: false")
    return arg if arg is not None else (None, None)


def check(handle, cfg: Config) -> None:
    """Before any work: the feed-forwards exist, are wide enough and convertible."""
    if handle.pipeline is None:
        return
    for u in _units(handle, cfg):
        convert.spec_of(handle.transformer, u)
    _time_argument(handle, cfg)


def _tokens(t: torch.Tensor, conv: bool) -> torch.Tensor:
    if conv:
        return t.permute(0, *range(2, t.dim()), 1).reshape(-1, t.shape[1])
    return t.reshape(-1, t.shape[-1])


def _record(handle, samples, specs: list[dict], max_tokens: int, seed: int):
    """Per unit: FFN input tokens X [T, D] and hidden activations A [T, H] (a random subset of
    at most ``max_tokens`` tokens, spread over the samples)."""
    tr = handle.transformer
    per_call = max(1, max_tokens // max(len(samples), 1))
    gen = torch.Generator().manual_seed(seed)
    xs: dict[str, list] = {s["unit"]: [] for s in specs}
    hs: dict[str, list] = {s["unit"]: [] for s in specs}
    pick: dict[str, torch.Tensor] = {}
    hooks = []

    def on_in(unit, conv):
        def hook(_m, args):
            t = _tokens(args[0].detach(), conv).float()
            idx = torch.randperm(t.shape[0], generator=gen)[:per_call].to(t.device)
            pick[unit] = idx
            xs[unit].append(t.index_select(0, idx).cpu())
        return hook

    def on_out(unit, conv, off, hidden):
        def hook(_m, args):
            t = _tokens(args[0].detach(), conv)[:, off:off + hidden].float()
            hs[unit].append(t.index_select(0, pick[unit]).cpu())
        return hook

    for s in specs:
        first, o = s["ins"][0], s["out"]
        hooks.append(tr.get_submodule(first["name"]).register_forward_pre_hook(
            on_in(s["unit"], first["conv"])))
        hooks.append(tr.get_submodule(o["name"]).register_forward_pre_hook(
            on_out(s["unit"], o["conv"], o["offset"], s["hidden"])))
    try:
        replay(handle, samples)
    finally:
        for h in hooks:
            h.remove()
    for s in specs:
        if not xs[s["unit"]] or len(xs[s["unit"]]) != len(hs[s["unit"]]):
            raise UserError(f"to_moe: {s['unit']} did not run as one feed-forward on the "
                            "calibration calls (its first and last layers ran a different "
                            "number of times); it cannot be converted")
    return ({u: torch.cat(v) for u, v in xs.items()}, {u: torch.cat(v) for u, v in hs.items()})


def _in_rows(tr: nn.Module, spec: dict) -> torch.Tensor:
    """[H, F]: each hidden channel's input weights (both halves of a gated layer)."""
    first = spec["ins"][0]
    w = convert.first_layer(tr, spec).weight.detach().float()
    w = w.reshape(w.shape[0], -1)
    h = spec["hidden"]
    return torch.cat([w[p * h:(p + 1) * h] for p in range(first["parts"])], dim=1)


def _out_cols(tr: nn.Module, spec: dict) -> torch.Tensor:
    o = spec["out"]
    w = tr.get_submodule(o["name"]).weight.detach().float()
    w = w.reshape(w.shape[0], -1)
    return w[:, o["offset"]:o["offset"] + spec["hidden"]]


def _outputs(handle, samples) -> list[torch.Tensor]:
    dev = handle.run.get("device", "cpu")
    with torch.no_grad():
        out = []
        for i in range(len(samples)):
            s = samples.sample(i).to(dev)
            out.append(handle.adapter.call(handle.transformer, s.args, s.kwargs).float())
        return out


def apply(handle, calib, cfg: Config) -> PassResult:
    from compress.prune import width_scores as ws

    tr = handle.transformer
    t0 = time.perf_counter()
    units = _units(handle, cfg)
    specs = [convert.spec_of(tr, u) for u in units]
    t_name, t_pos = _time_argument(handle, cfg)
    if calib is None or not len(calib):
        raise UserError("to_moe needs calibration data (prompts, or calibrate_fn for a module)")
    samples = calib.subset(cfg.calib_samples)
    ctx = moe.time_context(tr, t_name, t_pos, 1.0)
    xs, hs = _record(handle, samples, specs, cfg.max_tokens, cfg.seed)
    scale = moe.settle_scale(tr)  # the recorded calls showed the timestep range
    if cfg.split == "random":
        importance = ws.random_scores(units, cfg.seed)
    else:
        importance = ws.taylor(handle, samples, units, cfg.seed)
    check_set = samples.subset(min(4, len(samples)))
    before = _outputs(handle, check_set)
    meta_units, widths_report = [], {}
    ffn_total = ffn_active = 0
    for u, spec in zip(units, specs):
        shared = round(cfg.shared * u.count)
        in_rows = _in_rows(tr, spec)
        shared_idx, groups = split.assign(cfg.split, importance[u.name], in_rows,
                                          hs[u.name], shared, cfg.experts, cfg.seed)
        if cfg.router_init == "lstsq":
            router = split.router_lstsq(xs[u.name], split.contribution(
                hs[u.name], _out_cols(tr, spec), groups))
        else:
            router = split.router_centroid(in_rows, groups, spec["ins"][0]["dim"])
        dense = sum(convert.first_layer(tr, spec, j).weight.numel()
                    for j in range(len(spec["ins"]))) + _out_cols(tr, spec).numel()
        route = convert.convert(tr, spec, shared_idx, groups, cfg.top_k, cfg.router_timestep,
                                router, ctx)
        per_expert = route.expert_params
        ffn_total += dense
        router_w = sum(p.numel() for m in (route.router, route.t_router) if m is not None
                       for p in m.parameters())
        ffn_active += dense - sum(per_expert) * (1 - cfg.top_k / cfg.experts) + router_w
        widths_report[u.name] = [len(shared_idx), [len(g) for g in groups]]
        meta_units.append({"spec": spec, "shared": len(shared_idx),
                           "widths": [len(g) for g in groups],
                           # original hidden channel of each new one (LoRA keys follow it)
                           "order": [int(i) for i in (*shared_idx, *(i for g in groups
                                                                    for i in g))]})
    after = _outputs(handle, check_set)
    err = [float((a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-20))
           for a, b in zip(after, before)]
    report = {
        "experts": cfg.experts, "top_k": cfg.top_k, "shared": cfg.shared, "split": cfg.split,
        "router_init": cfg.router_init, "router_timestep": cfg.router_timestep,
        "feedforwards": len(units), "widths": widths_report,
        "ffn_weights": ffn_total, "ffn_weights_active_per_token": round(ffn_active),
        "ffn_active_fraction": round(ffn_active / max(ffn_total, 1), 4),
        "timestep_argument": t_name, "timestep_scale": scale,
        "output_rel_mse_before_training": round(sum(err) / len(err), 6),
        "seconds": round(time.perf_counter() - t0, 3)}
    meta = {"units": meta_units, "top_k": cfg.top_k, "router_timestep": cfg.router_timestep,
            "time": {"name": t_name, "position": t_pos, "scale": scale}}
    return PassResult(meta=meta, report=report)


def restore(transformer: nn.Module, cfg: Config, meta: dict) -> None:
    t = meta.get("time") or {}
    ctx = moe.time_context(transformer, t.get("name"), t.get("position"),
                           float(t.get("scale", 1000.0)))
    for u in meta["units"]:
        convert.rebuild(transformer, u["spec"], int(u["shared"]), [int(w) for w in u["widths"]],
                        int(meta["top_k"]), bool(meta["router_timestep"]), ctx)


register_pass(PassDef(name="to_moe", config=Config, apply=apply, restore=restore,
                      kind="structural", check=check))
