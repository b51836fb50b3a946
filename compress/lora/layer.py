"""LoRA adapters on compressed layers, through PEFT's own machinery.

PEFT wraps only torch's layer types (``Target module QLinear(...) is not supported``). Here a
PEFT ``lora.Linear`` subclass hosts an adapter beside any of our compressed linears: the
compressed layer runs as stored and the adapter's ``B @ A`` runs as a floating-point side
branch, so strengths (``set_adapters``, ``scale_layer``), several adapters, disabling and
unloading behave as on the original. ``merge`` (``fuse_lora``, ``merge_and_unload``) folds the
adapter into the compressed weights by re-quantising the layer in its own format (see
:mod:`compress.lora.fold`), with a warning that says so; ``unmerge`` puts the stored codes back
exactly.

:func:`install` registers the class with PEFT's dispatcher, so every PEFT entry point
(``inject_adapter_in_model``, ``PeftModel.from_pretrained``, diffusers' ``load_lora_weights``)
picks it for our layers. It runs when a compressed output is loaded and from
:func:`compress.load_lora`; it is idempotent and changes nothing for other layer types.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from compress.lora import int8_down

_INSTALLED = False


def _lora_linear_base():
    from peft.tuners.lora.layer import Linear

    return Linear


def _make_class():
    Linear = _lora_linear_base()

    class CompressedLoraLinear(Linear):
        """A LoRA side branch beside a compressed linear (QLinear, W8A8Linear, VQLinear, ...)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any):
            if getattr(config, "use_dora", False):
                raise ValueError(f"{type(base_layer).__name__}: DoRA needs the layer's float "
                                 "weight; load the adapter as plain LoRA, or on the original")
            self._stash: dict[str, dict[str, torch.Tensor]] = {}
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def _get_in_out_features(self, module: nn.Module):
            return module.in_features, module.out_features

        def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
            # PEFT takes the dtype of the stored weight, which here may be int8 or fp8 codes:
            # the branch only follows the layer's device and stays in floating point
            base = self.get_base_layer()
            if device is None:
                device = next((t.device for t in base.buffers() if t is not None), None)
            if device is None or device.type == "meta":
                return
            for attr in self.adapter_layer_names + self.other_param_names:
                holder = getattr(self, attr, None)
                if isinstance(holder, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in holder:
                    item = holder[adapter_name]
                    params = list(item.parameters()) if isinstance(item, nn.Module) else [item]
                    if not any(p.device.type == "meta" for p in params):
                        item.to(device)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            # A W8A8 layer that applies the feed-forward's GELU inside its GEMM must add the
            # branch before the activation: the base runs without it, the activation after.
            from compress.modules.w8a8 import W8A8Linear
            from compress.quant import kernels

            # attributes read from the instance dicts: nn.Module's __getattr__ and PEFT's
            # properties cost microseconds a call, on every Linear of every step
            base = self._modules["base_layer"]
            act = getattr(base, "activation", "none")
            plain = not (args or kwargs) and self.plain()
            if plain and isinstance(base, W8A8Linear) and act != "none":
                # the branch joins in the layer's rescale pass, before its activation
                return base(x, addend=self._side_branch(x, None))
            if plain:
                y = self._side_branch(x, base(x, activation="none") if act != "none" else base(x))
            elif act == "none" or kwargs.get("activation") is not None:
                return super().forward(x, *args, **kwargs)
            else:
                y = super().forward(x, *args, activation="none", **kwargs)
            return kernels.apply_activation(y, act) if act != "none" else y

        def plain(self) -> bool:
            """Whether the call is the base layer plus each active adapter's side branch (no
            adapter merged or disabled, no variant such as DoRA)."""
            active = self._active_adapter
            active = (active,) if isinstance(active, str) else active
            return not (self._disable_adapters or self.merged_adapters
                        or any(a in self.lora_variant for a in active))

        def _active_names(self) -> list[str]:
            active = self._active_adapter
            return [n for n in ((active,) if isinstance(active, str) else active)
                    if n in self._modules["lora_A"]._modules]

        def branch_on_codes_ok(self) -> bool:
            """Whether :meth:`branch_on_codes` applies: no active adapter has dropout (which
            needs the float input)."""
            drops = self._modules["lora_dropout"]._modules
            return all(isinstance(drops[n], nn.Identity) for n in self._active_names())

        def branch_on_codes(self, xq: torch.Tensor, x_scale: torch.Tensor,
                            y: torch.Tensor) -> torch.Tensor:
            """``y`` [M, out] plus the side branch of an input that exists only as the base
            layer's per-token int8 codes (a fused feed-forward's hidden activation): the
            down-projection on the codes (:func:`int8_down.down`), accumulated into ``y`` in
            place."""
            base = self._modules["base_layer"]
            for name in self._active_names():
                h = int8_down.down(self, name, base, None, y.dtype, codes=(xq, x_scale))
                y = self._up(y, h, name, y.dtype, True)
            return y

        def _up(self, y2: torch.Tensor | None, h: torch.Tensor, name: str, dtype: torch.dtype,
                in_place: bool) -> torch.Tensor:
            # y + scaling * h B^T, accumulated into y by one addmm (in place when allowed)
            b = self._modules["lora_B"]._modules[name]
            if h.dtype != dtype:
                h = h.to(dtype)
            s = self.scaling[name]
            bt = b.weight.t()
            if bt.dtype != dtype:
                bt = bt.to(dtype)
            if y2 is None:
                y2 = torch.mm(h * s, bt)
            elif in_place:
                y2.addmm_(h, bt, alpha=s)
            else:
                y2 = torch.addmm(y2, h, bt, alpha=s)
            if b.bias is not None:
                y2 = y2 + s * b.bias.to(dtype)
            return y2

        def _side_branch(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
            # the down-projection on the base layer's own int8 input codes where that is faster
            # (dynamic W8A8; see compress.lora.int8_down), else in the adapter's dtype
            # y + scaling * (x A^T) B^T, the second product accumulated into y by one addmm
            # (no separate scale and add passes over the layer's output; in place without
            # autograd, y being the base layer's fresh output). y None: the branch alone
            # ([M, out] in x's dtype; None when no adapter is active).
            in_place = y is not None and not torch.is_grad_enabled()
            shape = (*x.shape[:-1], self.out_features) if y is None else y.shape
            dtype = x.dtype if y is None else y.dtype
            y2 = None if y is None else y.reshape(-1, shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            mods = self._modules
            lora_a = mods["lora_A"]._modules
            drops = mods["lora_dropout"]._modules
            base = mods["base_layer"]
            codes = int8_down.usable(base, x)
            for name in self._active_names():
                a, drop = lora_a[name], drops[name]
                aw = a.weight
                if codes and isinstance(drop, nn.Identity):
                    h = int8_down.down(self, name, base, x, dtype)
                else:
                    xa = x2 if x2.dtype == aw.dtype else x2.to(aw.dtype)
                    if not isinstance(drop, nn.Identity):
                        xa = drop(xa)
                    h = torch.nn.functional.linear(xa, aw, a.bias)
                y2 = self._up(y2, h, name, dtype, in_place)
            return y2 if y2 is None else y2.view(shape)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge

            from compress.lora.fold import fold_

            names = check_adapters_to_merge(self, adapter_names)
            base = self.get_base_layer()
            for name in names:
                if name not in self.lora_A:
                    continue
                delta = self.get_delta_weight(name)
                if safe_merge and not torch.isfinite(delta).all():
                    raise ValueError(f"adapter {name!r}: NaN or inf in its weights; not merged")
                self._stash[name] = {k: v.clone() for k, v in base.state_dict().items()}
                fold_(base, delta)
                self.merged_adapters.append(name)
                warnings.warn(f"{type(base).__name__}: adapter {name!r} folded into the "
                              "compressed weights by re-quantising them (the side branch is "
                              "exact; the folded layer is within one rounding step)",
                              stacklevel=2)

        def unmerge(self) -> None:
            base = self.get_base_layer()
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                stash = self._stash.pop(name, None)
                if stash is not None:  # the layers' load hooks drop what they derived
                    base.load_state_dict(stash)

        def __repr__(self) -> str:
            return "lora.Compressed" + nn.Module.__repr__(self)

    return CompressedLoraLinear


_CLASS = None


def lora_class():
    """The PEFT layer class for compressed linears (built on first use: peft is optional)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS


def _unsupported() -> tuple[type, ...]:
    from compress.modules.moe import MoEIn, MoEOut
    from compress.modules.qconv import QConv2d

    return (QConv2d, MoEIn, MoEOut)


def install() -> bool:
    """Teach PEFT's dispatcher our compressed linears (idempotent). False if peft is missing."""
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        from peft.tuners.lora.model import LoraModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    from compress.lora.fold import compressed_linear_types

    original = LoraModel._create_new_module
    hosts = compressed_linear_types()

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, hosts):
            return lora_class()(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base, _unsupported()):
            raise ValueError(  # noqa: TRY004 - the error PEFT raises for a layer it cannot wrap
                f"{type(base).__name__}: dit-compress has no LoRA side branch for this layer "
                "(quantised convolutions, mixture-of-experts halves); leave it out of the "
                "adapter's target modules, or load the file with compress.load_lora (or the "
                "pipeline's load_lora_weights), which puts a feed-forward's adapter on its "
                "experts and skips quantised convolutions")
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module.__wrapped__ = original
    LoraModel._create_new_module = staticmethod(_create_new_module)
    _INSTALLED = True
    return True
