"""Unfused, numerically equivalent stand-ins for torch's attention and transformer layers.

``nn.MultiheadAttention`` keeps q/k/v in one packed ``in_proj_weight`` Parameter (or in
``q/k/v_proj_weight`` when kdim/vdim differ) and reads ``out_proj.weight`` directly inside
``F.multi_head_attention_forward``; ``nn.TransformerEncoderLayer`` in eval mode runs a fused
kernel (``torch._transformer_encoder_layer_fwd``) on the raw weights of its attention and
feed-forward; ``nn.TransformerEncoder`` may turn its input into a nested tensor that only the
fused kernel accepts. A pass that swaps ``nn.Linear`` children therefore either misses these
weights or is silently bypassed (hooks even switch the fused path off, so a hook-based check
sees the slow path that inference does not take).

The modules here compute the same function from real ``nn.Linear`` children that are always
called as modules: :class:`UnfusedMultiheadAttention` (``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``), :class:`UnfusedTransformerEncoderLayer`, :class:`UnfusedTransformerDecoderLayer`
(the decoder layer has no fused path today; it is replaced so a future one cannot bypass us) and
:class:`UnfusedTransformerEncoder`. Every class has ``from_torch(module)``, which copies the
weights exactly; :func:`unfuse` converts a whole model in place and returns what it changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# parameter of nn.MultiheadAttention -> parameters of UnfusedMultiheadAttention
PACKED_MAP = {
    "in_proj_weight": ["q_proj.weight", "k_proj.weight", "v_proj.weight"],
    "in_proj_bias": ["q_proj.bias", "k_proj.bias", "v_proj.bias"],
}
SEPARATE_MAP = {
    "q_proj_weight": ["q_proj.weight"],
    "k_proj_weight": ["k_proj.weight"],
    "v_proj_weight": ["v_proj.weight"],
    "in_proj_bias": ["q_proj.bias", "k_proj.bias", "v_proj.bias"],
}


def _float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """torch's mask convention: bool True = masked out (-inf); float masks are added as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


def _param(t: Tensor | None) -> nn.Parameter | None:
    """A private copy of ``t`` (same device, dtype and requires_grad)."""
    if t is None:
        return None
    return nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = _param(weight)
    if bias is not None:
        lin.bias = _param(bias)
    return lin


def _overrides_forward(mod: nn.Module, base: type) -> bool:
    return type(mod).forward is not base.forward


class UnfusedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with four separate ``nn.Linear`` projections.

    Same call signature and outputs (including ``need_weights``, ``average_attn_weights``,
    ``is_causal``, unbatched inputs, ``add_bias_kv`` and ``add_zero_attn``); the attention itself
    runs on ``F.scaled_dot_product_attention`` unless the weights are asked for.
    ``cross`` only labels the projections for layer selection (cross-attention roles).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        cross: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be a positive multiple of num_heads "
                             f"{num_heads}")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self.cross = cross
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim, **kw))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim, **kw))
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, cross: bool | None = None):
        """The equivalent of ``mha`` with its weights copied exactly (also on the meta device).

        ``cross`` defaults to True when the keys/values have their own width (kdim/vdim).
        """
        e = mha.embed_dim
        packed = mha.in_proj_weight is not None
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.embed_dim, new.kdim, new.vdim = e, mha.kdim, mha.vdim
        new.num_heads, new.head_dim = mha.num_heads, mha.head_dim
        new.dropout, new.batch_first = mha.dropout, mha.batch_first
        new.add_zero_attn = bool(mha.add_zero_attn)
        new.cross = (not packed) if cross is None else cross
        b = mha.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        if packed:
            w = mha.in_proj_weight
            wq, wk, wv = w[:e], w[e : 2 * e], w[2 * e :]
        else:
            wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        new.q_proj = _linear(wq, bq)
        new.k_proj = _linear(wk, bk)
        new.v_proj = _linear(wv, bv)
        new.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)
        new.bias_k = _param(mha.bias_k)
        new.bias_v = _param(mha.bias_v)
        new.train(mha.training)
        return new

    @staticmethod
    def weight_map(mha: nn.MultiheadAttention) -> dict[str, list[str]]:
        """Where each parameter of ``mha`` goes in the unfused module."""
        m = dict(PACKED_MAP if mha.in_proj_weight is not None else SEPARATE_MAP)
        if mha.in_proj_bias is None:
            m.pop("in_proj_bias")
        m["out_proj.weight"] = ["out_proj.weight"]
        if mha.out_proj.bias is not None:
            m["out_proj.bias"] = ["out_proj.bias"]
        if mha.bias_k is not None:
            m["bias_k"], m["bias_v"] = ["bias_k"], ["bias_v"]
        return m

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}, cross={self.cross}")

    def _heads(self, x: Tensor) -> Tensor:  # (N, L, E) -> (N, H, L, D)
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        kpm = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch does)")
        # torch hands a causal hint to SDPA only when nothing else needs the explicit mask
        sdpa_causal = bool(is_causal) and kpm is None and not need_weights
        mask = None if sdpa_causal else _float_mask(attn_mask, "attn_mask", query.dtype)

        # batch first, batched, internally: (N, L, E)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if kpm is not None:
                kpm = kpm.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt_len, _ = query.shape
        src_len = key.shape[1]

        q = self._heads(self.q_proj(query))
        k = self.k_proj(key)
        v = self.v_proj(value)

        if mask is not None:
            if mask.dim() == 2:
                if tuple(mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(mask.shape)}, "
                                       f"but should be {(tgt_len, src_len)}.")
                mask = mask.view(1, 1, tgt_len, src_len)
            elif mask.dim() == 3:
                want = (n * self.num_heads, tgt_len, src_len) if batched else \
                    (self.num_heads, tgt_len, src_len)
                if tuple(mask.shape) != want:
                    raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(mask.shape)}, "
                                       f"but should be {want}.")
                mask = mask.view(n, self.num_heads, tgt_len, src_len)
            else:
                raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
        if self.bias_k is not None:  # one learned extra key/value position, after projection
            k = torch.cat([k, self.bias_k.expand(n, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, -1)], dim=1)
            mask = F.pad(mask, (0, 1)) if mask is not None else None
            kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
        k, v = self._heads(k), self._heads(v)
        if self.add_zero_attn:  # one all-zero key/value position per head
            zeros = torch.zeros(n, self.num_heads, 1, self.head_dim, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            mask = F.pad(mask, (0, 1)) if mask is not None else None
            kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
        s = k.shape[2]
        if kpm is not None:
            if tuple(kpm.shape) != (n, s):
                raise RuntimeError(f"key_padding_mask has shape {tuple(kpm.shape)}, expected "
                                   f"{(n, s)}")
            kpm = kpm.view(n, 1, 1, s)
            mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = (F.dropout(weights, p=p) if p > 0 else weights) @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=sdpa_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt_len, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _activation(layer: nn.Module) -> Callable[[Tensor], Tensor] | nn.Module:
    return getattr(layer, "activation", F.relu)


class UnfusedTransformerEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` without the fused fast path; same child names."""

    def __init__(self) -> None:  # built by from_torch only
        super().__init__()

    @classmethod
    def from_torch(cls, layer: nn.TransformerEncoderLayer):
        """Takes over ``layer``'s feed-forward and norm modules; the attention is unfused."""
        new = cls()
        sa = layer.self_attn
        new.self_attn = sa if isinstance(sa, UnfusedMultiheadAttention) else \
            UnfusedMultiheadAttention.from_torch(sa, cross=False)
        for name in ("linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2"):
            setattr(new, name, getattr(layer, name))
        new.norm_first = layer.norm_first
        new.activation = _activation(layer)
        new.train(layer.training)
        return new

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        kpm = _float_mask(src_key_padding_mask, "src_key_padding_mask", src.dtype)
        mask = _float_mask(src_mask, "src_mask", src.dtype)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), mask, kpm, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, mask, kpm, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x: Tensor, mask, kpm, is_causal: bool) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class UnfusedTransformerDecoderLayer(nn.Module):
    """``nn.TransformerDecoderLayer`` with unfused attentions (``multihead_attn`` is cross)."""

    def __init__(self) -> None:  # built by from_torch only
        super().__init__()

    @classmethod
    def from_torch(cls, layer: nn.TransformerDecoderLayer):
        new = cls()
        for name, cross in (("self_attn", False), ("multihead_attn", True)):
            a = getattr(layer, name)
            if isinstance(a, UnfusedMultiheadAttention):
                a.cross = cross
            else:
                a = UnfusedMultiheadAttention.from_torch(a, cross=cross)
            setattr(new, name, a)
        for name in ("linear1", "dropout", "linear2", "norm1", "norm2", "norm3", "dropout1",
                     "dropout2", "dropout3"):
            setattr(new, name, getattr(layer, name))
        new.norm_first = layer.norm_first
        new.activation = _activation(layer)
        new.train(layer.training)
        return new

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask,
                                    memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                               memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa_block(self, x: Tensor, mask, kpm, is_causal: bool) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=kpm, is_causal=is_causal,
                           need_weights=False)[0]
        return self.dropout1(x)

    def _mha_block(self, x: Tensor, mem: Tensor, mask, kpm, is_causal: bool) -> Tensor:
        x = self.multihead_attn(x, mem, mem, attn_mask=mask, key_padding_mask=kpm,
                                is_causal=is_causal, need_weights=False)[0]
        return self.dropout2(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class UnfusedTransformerEncoder(nn.Module):
    """``nn.TransformerEncoder`` over unfused layers.

    In eval mode with a key padding mask torch runs the layers on a nested tensor, which drops
    the padded positions and returns zeros there. ``zero_padding`` (copied from torch's
    ``use_nested_tensor``) keeps that: under the same conditions the padded positions are
    excluded as keys and their outputs are zero (before the final norm), on dense tensors.
    """

    def __init__(self) -> None:  # built by from_torch only
        super().__init__()

    @classmethod
    def from_torch(cls, enc: nn.TransformerEncoder):
        new = cls()
        new.layers = enc.layers
        new.num_layers = enc.num_layers
        new.norm = enc.norm
        new.mask_check = getattr(enc, "mask_check", True)
        new.zero_padding = bool(getattr(enc, "use_nested_tensor", False))
        new.train(enc.training)
        return new

    def _zeroes_padding(self, src: Tensor, mask, kpm) -> Tensor | None:
        """The valid-position mask (N, S) when torch would take its nested-tensor path."""
        if not (self.zero_padding and torch.backends.mha.get_fastpath_enabled()):
            return None
        first = self.layers[0]
        if first.training or src.dim() != 3 or kpm is None or mask is not None:
            return None
        if torch.is_autocast_enabled():
            return None
        if torch.is_grad_enabled() and (
            src.requires_grad or any(p.requires_grad for p in first.parameters())
        ):
            return None
        valid = kpm.logical_not()  # float masks: any non-zero entry counts as padding
        if self.mask_check:
            left = valid.long().cumprod(dim=1).sum(dim=1) == valid.sum(dim=1)
            if not bool(left.all()):
                return None
        return valid

    def forward(
        self,
        src: Tensor,
        mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool | None = None,
    ) -> Tensor:
        kpm = _float_mask(src_key_padding_mask, "src_key_padding_mask", src.dtype)
        mask = _float_mask(mask, "mask", src.dtype)
        valid = self._zeroes_padding(src, mask, kpm)
        if valid is not None:  # padding fully excluded, as the nested path does
            kpm = torch.zeros_like(kpm).masked_fill_(~valid, float("-inf"))
        out = src
        for mod in self.layers:
            out = mod(out, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=kpm)
        if valid is not None:
            bf = self.layers[0].self_attn.batch_first
            keep = valid if bf else valid.transpose(0, 1)
            out = torch.where(keep.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype))
        if self.norm is not None:
            out = self.norm(out)
        return out


def _convert(mod: nn.Module) -> nn.Module | None:
    """The unfused equivalent of ``mod``, or None when ``mod`` is not one we replace.

    Subclasses that override ``forward`` are left alone: their behaviour is their own.
    """
    if isinstance(mod, nn.MultiheadAttention):
        if _overrides_forward(mod, nn.MultiheadAttention):
            return None
        return UnfusedMultiheadAttention.from_torch(mod)
    if isinstance(mod, nn.TransformerEncoderLayer):
        if _overrides_forward(mod, nn.TransformerEncoderLayer):
            return None
        return UnfusedTransformerEncoderLayer.from_torch(mod)
    if isinstance(mod, nn.TransformerDecoderLayer):
        if _overrides_forward(mod, nn.TransformerDecoderLayer):
            return None
        return UnfusedTransformerDecoderLayer.from_torch(mod)
    if isinstance(mod, nn.TransformerEncoder):
        if _overrides_forward(mod, nn.TransformerEncoder) or not all(
            isinstance(layer, UnfusedTransformerEncoderLayer) for layer in mod.layers
        ):
            return None
        return UnfusedTransformerEncoder.from_torch(mod)
    return None


def _put(root: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        # the root cannot be re-parented: the object itself becomes the new module, so the
        # caller's reference (and a pass's ``transformer``) sees the change
        root.__class__ = type(new)
        root.__dict__.clear()
        root.__dict__.update(new.__dict__)
        return
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def unfuse(root: nn.Module) -> list[dict]:
    """Replace, in place, every torch attention / transformer layer that hides weights from
    module swaps by its unfused equivalent. Returns one record per replaced module (in the
    order applied): ``{"module", "was", "now", "weights"?}`` where ``weights`` maps each old
    parameter name to its new name(s). Children are converted before their parents; a module
    reachable under several names is converted once and replaced everywhere.
    """
    entries = list(root.named_modules(remove_duplicate=False))
    done: dict[int, nn.Module] = {}
    records: list[dict] = []
    for name, mod in reversed(entries):  # reversed pre-order: descendants before ancestors
        if id(mod) in done:
            new = done[id(mod)]
            if new is not mod:
                _put(root, name, new)
            continue
        wmap = UnfusedMultiheadAttention.weight_map(mod) \
            if isinstance(mod, nn.MultiheadAttention) else None
        was = type(mod).__name__
        new = _convert(mod)
        done[id(mod)] = new if new is not None else mod
        if new is None:
            continue
        _put(root, name, new)
        rec = {"module": name, "was": was, "now": type(new).__name__}
        if wmap is not None and new is not None:
            rec["weights"] = wmap
        records.append(rec)
        if not name:
            done[id(mod)] = mod  # converted in place
    return records
