"""``compress.load_lora``: one call that puts a LoRA made for the original model on a pipeline or
module, compressed or not, and the hook that lets diffusers' own ``load_lora_weights`` do the
same on a compressed output whose structure changed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import UserError
from compress.lora import remap
from compress.lora.layer import install, lora_class

_PREFIXES = ("base_model.model.", "transformer.")
# the file a LoRA folder holds, as PEFT and diffusers name it (others: the first by name)
_WEIGHT_NAMES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")


def read(src: str | Path | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA's tensors and its config (``lora_alpha``, ``r``) from a dict, a .safetensors file
    or a PEFT adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``)."""
    if isinstance(src, dict):
        return dict(src), {}
    from safetensors import safe_open

    p = Path(src)
    cfg: dict[str, Any] = {}
    if p.is_dir():
        if (p / "adapter_config.json").is_file():
            cfg = json.loads((p / "adapter_config.json").read_text())
        files = sorted(p.glob("*.safetensors"),
                       key=lambda f: (f.name not in _WEIGHT_NAMES, f.name))
        if not files:
            raise UserError(f"{p}: no .safetensors file in this LoRA directory")
        p = files[0]
    if not p.is_file():
        raise UserError(f"{p}: no such LoRA file")
    try:
        with safe_open(str(p), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"{p}: not a readable safetensors file ({exc})") from None
    for k in ("lora_adapter_metadata", "transformer_lora_adapter_metadata"):
        if k in meta and not cfg:
            try:
                cfg = json.loads(meta[k])
            except ValueError:
                cfg = {}
            if isinstance(cfg, dict) and any(str(c).startswith("transformer.") for c in cfg):
                cfg = {c[len("transformer."):]: v for c, v in cfg.items()
                       if c.startswith("transformer.")}  # diffusers packs it per component
            cfg = cfg if isinstance(cfg, dict) else {}
    return sd, cfg


def by_layer(sd: dict[str, torch.Tensor], prefix: str | None = None
             ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Group tensors by layer path ({path: {part: tensor}}); the rest returned as they are."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, t in sd.items():
        k = key
        if prefix is not None:
            if not k.startswith(prefix + "."):
                rest[key] = t
                continue
            k = k[len(prefix) + 1:]
        else:
            for pre in _PREFIXES:
                k = k.removeprefix(pre)
        k = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        s = remap.split_key(k)
        if s is None:
            rest[key] = t
            continue
        layers.setdefault(s[0], {})[s[1]] = t
    return layers, rest


def _passes(module: nn.Module) -> list[dict]:
    return getattr(module, "_dit_compress_passes", None) or []


def _hosts() -> tuple[type, ...]:
    from compress.lora.fold import compressed_linear_types

    return compressed_linear_types()


def for_model(layers: dict[str, dict], module: nn.Module) -> dict[str, dict]:
    """Re-address ``layers`` (made for the original) to ``module``; one warning names the
    layers left out."""
    layers, notes = remap.through_passes(layers, _passes(module))
    layers = remap.fit(layers, module, _hosts(), notes)
    if notes:
        shown = "; ".join(notes[:8]) + (f"; and {len(notes) - 8} more" if len(notes) > 8 else "")
        warnings.warn(f"LoRA: {len(notes)} layer(s) left out: {shown}", stacklevel=3)
    if not layers:
        raise UserError("LoRA: none of its layers fits this model (see the warning for why); "
                        "was it made for another model?")
    return layers


def attach(module: nn.Module, passes: list[dict]) -> None:
    """Called by the loaders: remember the output's passes on ``module``, teach PEFT our layers,
    and, where the structure changed, let diffusers' ``load_lora_adapter`` re-address keys."""
    module._dit_compress_passes = passes
    install()
    original = getattr(module, "load_lora_adapter", None)
    if original is None or not remap.structural(passes):
        return

    def load_lora_adapter(src, *args, prefix: str | None = "transformer", **kwargs):
        sd, _ = read(src) if not isinstance(src, dict) else (src, {})
        layers, rest = by_layer(sd, prefix)
        lead = f"{prefix}." if prefix else ""
        fitted = for_model(layers, module)
        sd = dict(rest)
        for path, parts in fitted.items():
            sd.update({f"{lead}{path}.{k}": v for k, v in parts.items()})
        if isinstance(kwargs.get("metadata"), dict):
            kwargs["metadata"] = _metadata_for(kwargs["metadata"], fitted, module)
        return original(sd, *args, prefix=prefix, **kwargs)

    module.load_lora_adapter = load_lora_adapter


def _metadata_for(meta: dict, fitted: dict[str, dict], module: nn.Module) -> dict:
    """The file's LoRA config (diffusers passes it to PEFT) re-addressed like its tensors: the
    target modules are the layers that now take the adapter, and a rank or alpha given for a
    layer to_moe split applies to each of its pieces."""
    mods = dict(module.named_modules())
    parent = {}
    for path in fitted:
        owner, _, child = path.rpartition(".")
        if child.isdigit() and owner.endswith(".experts"):
            owner = owner[: -len(".experts")]
        if type(mods.get(owner)).__name__ in ("MoEIn", "MoEOut"):
            parent[path] = owner + ".proj" if getattr(mods[owner], "act", None) else owner
    out = dict(meta)
    for key, value in meta.items():
        if key.endswith("target_modules") and value is not None:
            out[key] = sorted(fitted)
        elif key.endswith(("rank_pattern", "alpha_pattern")) and isinstance(value, dict):
            hit = {k: v for k, v in value.items()
                   if any(p == k or p.endswith("." + k) for p in fitted)}
            extra = {p: v for k, v in value.items() for p, q in parent.items()
                     if q == k or q.endswith("." + k)}
            out[key] = {**hit, **extra}  # PEFT refuses a pattern that matches no layer
    return out


def attach_pipeline(pipe) -> None:
    """Called by load_pipeline: FLUX's loader widens LoRA tensors to a layer's stored ``weight``
    shape (for Control LoRAs), which compressed layers do not store under that name; on them
    it is skipped (their shapes are checked, and mismatches named, by ``load_lora_adapter``)."""
    original = getattr(pipe, "_maybe_expand_lora_state_dict", None)
    tr = getattr(pipe, "transformer", None)
    if original is None or tr is None:
        return
    plain = torch.nn.Linear

    def _maybe_expand_lora_state_dict(transformer, lora_state_dict):
        mods = dict(transformer.named_modules())
        lead = f"{getattr(pipe, 'transformer_name', 'transformer')}."
        for k in lora_state_dict:
            path = k.removeprefix(lead)
            s = remap.split_key(path)
            m = mods.get(s[0]) if s else None
            if m is not None and not isinstance(getattr(m, "base_layer", m), plain):
                return lora_state_dict
        return original(transformer=transformer, lora_state_dict=lora_state_dict)

    pipe._maybe_expand_lora_state_dict = _maybe_expand_lora_state_dict


def _inject(module: nn.Module, layers: dict[str, dict], cfg: dict, name: str,
            scale: float) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    ranks = {p: int(t["lora_A.weight"].shape[0]) for p, t in layers.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    bias = any("lora_B.bias" in t for t in layers.values())
    config = LoraConfig(r=r0, lora_alpha=r0, target_modules=sorted(layers),
                        rank_pattern={_exact(p): r for p, r in ranks.items() if r != r0},
                        init_lora_weights=False, lora_bias=bias)
    # PEFT reads the device off the module's first parameter; a fully compressed module may
    # have none (int codes are buffers, norms without affine weights): lend it an empty one
    probe = None
    if next(module.parameters(), None) is None:
        dev = next((t.device for t in module.buffers()), torch.device("cpu"))
        probe = "_lora_device_probe"
        module.register_parameter(probe, nn.Parameter(torch.empty(0, device=dev),
                                                      requires_grad=False))
    try:
        inject_adapter_in_model(config, module, adapter_name=name)
    finally:
        if probe is not None:
            del module._parameters[probe]
    alpha_all = cfg.get("lora_alpha")
    alphas = cfg.get("alpha_pattern") or {}
    mods = dict(module.named_modules())
    dtype = _float_dtype(module)
    with torch.no_grad():
        for path, t in layers.items():
            layer = mods[path]
            r = ranks[path]
            layer.lora_A[name].weight.copy_(t["lora_A.weight"])
            layer.lora_B[name].weight.copy_(t["lora_B.weight"])
            if "lora_B.bias" in t:
                layer.lora_B[name].bias.copy_(t["lora_B.bias"])
            a = t.get("alpha")
            alpha = float(a) if a is not None else float(
                next((v for k, v in alphas.items() if path.endswith(k)), alpha_all or r))
            layer.lora_alpha[name] = alpha
            layer.set_scale(name, scale)
            if dtype is not None:
                layer.lora_A[name].to(dtype)
                layer.lora_B[name].to(dtype)


def _exact(path: str) -> str:
    import re

    return re.escape(path)


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def lora_layers(module: nn.Module, name: str) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer) and name in m.lora_A]


def load_lora(target, src: str | Path | dict, scale: float = 1.0,
              adapter_name: str | None = None) -> str:
    """Put a LoRA made for the original model on ``target`` (a pipeline, or a transformer or
    your own module; compressed or not) as a side branch at strength ``scale``.

    Pipelines with a LoRA loader (SD3, FLUX, Sana, ...) go through their own
    ``load_lora_weights`` (every key format diffusers converts); everything else (PixArt, DiT,
    your own module) through PEFT. On a compressed output, keys of removed blocks, pruned
    channels and mixture-of-experts layers are re-addressed or left out, with one warning naming
    them. Returns the adapter's name (for ``set_adapters``, ``delete_adapters`` or
    :func:`unload_lora`).
    """
    if not install():
        raise UserError("LoRA needs peft: pip install peft")
    module = getattr(target, "transformer", target)
    if not isinstance(module, nn.Module):
        raise UserError(f"load_lora: expected a pipeline or an nn.Module, got {type(target).__name__}")
    name = adapter_name or _free_name(module)
    if hasattr(target, "load_lora_weights") and hasattr(module, "load_lora_adapter"):
        if not isinstance(src, dict):
            src = str(src)
        target.load_lora_weights(src, adapter_name=name)
        for layer in lora_layers(module, name):
            layer.set_scale(name, scale)
        return name
    sd, cfg = read(src)
    layers, _ = by_layer(sd)
    if not layers:
        raise UserError(f"{src}: no LoRA tensors (keys ending in lora_A.weight / lora_B.weight)")
    _inject(module, for_model(layers, module), cfg, name, scale)
    return name


def _free_name(module: nn.Module) -> str:
    from peft.tuners.lora import LoraLayer

    used = {n for m in module.modules() if isinstance(m, LoraLayer) for n in m.lora_A}
    i = 0
    while f"lora{i}" in used:
        i += 1
    return f"lora{i}"


def set_strength(target, name: str, scale: float) -> int:
    """Set adapter ``name``'s strength on every layer of ``target`` (a pipeline or module) that
    holds it, for pipelines without ``set_adapters`` (PixArt, DiT, your own module). Returns
    the number of layers."""
    module = getattr(target, "transformer", target)
    layers = lora_layers(module, name)
    if not layers:
        raise UserError(f"no LoRA adapter named {name!r} on this model")
    for layer in layers:
        layer.set_scale(name, scale)
    return len(layers)


def unload_lora(target) -> None:
    """Remove every adapter (unmerged ones leave the layers exactly as they were)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    module = getattr(target, "transformer", target)
    for path, m in list(module.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.unmerge()
            parent, _, child = path.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, m.get_base_layer())


def fuse_lora_into(module: nn.Module, src: str | Path, scale: float) -> list[str]:
    """Fold a LoRA into a float model for good (``run --lora``): calibration then sees what will
    run. Returns the layers it changed."""
    name = load_lora(module, src, scale, adapter_name="fused")
    from peft.tuners.tuners_utils import BaseTunerLayer

    done = []
    for path, m in list(module.named_modules()):
        if isinstance(m, BaseTunerLayer):
            if isinstance(m, lora_class()):
                raise UserError("--lora folds into the source model before compression; this "
                                "model is already compressed")
            m.merge(adapter_names=[name])
            parent, _, child = path.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, m.get_base_layer())
            done.append(path)
    return done


def check_source(src: str | Path) -> None:
    """``run --lora``: the file or folder exists and holds LoRA tensors (UserError if not)."""
    if not Path(src).exists():
        raise UserError(f"--lora {src}: no such file or directory")
    layers, _ = by_layer(read(src)[0])
    if not layers:
        raise UserError(f"--lora {src}: no LoRA tensors in it (keys ending in lora_A.weight / "
                        "lora_B.weight)")


def fuse_source(handle, src: str | Path, scale: float) -> dict:
    """``run --lora``: fold a LoRA into the loaded source model before calibration; the caches
    key on the model with it (source hash, LoRA digest and strength). Returns the report entry."""
    import hashlib

    p = Path(src)
    files = sorted(p.glob("*")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.read_bytes())
    digest = h.hexdigest()
    pipe = handle.pipeline
    if pipe is not None and hasattr(pipe, "load_lora_weights"):
        install()
        pipe.load_lora_weights(str(p), adapter_name="fused")
        layers = len(lora_layers(handle.transformer, "fused"))
        pipe.fuse_lora(lora_scale=scale, adapter_names=["fused"])
        pipe.unload_lora_weights()
    else:
        layers = len(fuse_lora_into(handle.transformer, p, scale))
    if handle.source_hash:
        handle.source_hash = hashlib.sha256(
            f"{handle.source_hash}+lora:{digest}@{scale!r}".encode()).hexdigest()
    return {"file": str(p), "sha256": digest, "scale": scale, "layers": layers}
