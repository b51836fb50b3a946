"""Torch-Pruning's magnitude pruner as a width-pruning peer (eval/peers.py ``tp-magnitude-20``,
``tp-magnitude-30``): the same share of the blocks' parameters removed as prune_width's
``sparsity``, as whole attention heads (self and cross) and feed-forward channels.

What it takes to run it on a diffusers DiT (torch-pruning 1.6, installed for this script only:
``pip install torch-pruning==1.6.1``; the registry here served 1.6.0):
- every Linear outside the blocks' q/k/v and first feed-forward layers is listed as ignored,
  so only heads and channels go (Torch-Pruning would otherwise cut the model width too);
- each attention's q/k/v are given their head count (``num_heads``) with
  ``prune_num_heads=True, prune_head_dims=False``, and after pruning ``Attention.heads`` is set
  by hand: Torch-Pruning shrinks the matrices but not the attribute the forward reads;
- a quarter of the heads go (1 of 4 on the demo) and the feed-forward ratio is solved so that
  the total matches the target; widths rounded to 8, as ours;
- the pruned model does not reload through ``from_pretrained`` (its config still says the
  original widths); this peer is evaluated in memory only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

HEAD_RATIO = 0.25


def _forward(handle):
    def fwd(model, inputs):
        a, k = inputs
        return handle.adapter.call(model, a, k)
    return fwd


def _block_params(handle) -> int:
    return sum(p.numel() for _, b in handle.adapter.blocks(handle.transformer)
               for p in b.parameters())


def _attentions(handle) -> list[nn.Module]:
    return [m for _, b in handle.adapter.blocks(handle.transformer) for m in b.modules()
            if hasattr(m, "heads") and isinstance(getattr(m, "to_q", None), nn.Linear)]


def _ffs(handle) -> list[nn.Module]:
    return [m for _, b in handle.adapter.blocks(handle.transformer) for m in b.modules()
            if isinstance(getattr(m, "net", None), nn.ModuleList)]


def _channel_cost(ff: nn.Module) -> int:
    """Parameters one hidden channel holds: its rows in the first layer, its column in the last."""
    first, last = ff.net[0].proj, [x for x in ff.net if isinstance(x, nn.Linear)][-1]
    rows = first.out_features // last.in_features
    return rows * (first.in_features + (first.bias is not None)) + last.out_features


def _prune(handle, sample, roots: list[nn.Module], ratio: float, heads: dict, head_ratio: float):
    import torch_pruning as tp

    tr = handle.transformer
    ignored = [m for m in tr.modules() if isinstance(m, nn.Linear) and m not in roots]
    pr = tp.pruner.MagnitudePruner(
        tr, (sample.args, sample.kwargs), importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored, forward_fn=_forward(handle),
        num_heads=heads, prune_num_heads=bool(heads), prune_head_dims=False,
        head_pruning_ratio=head_ratio, round_to=8)
    pr.step()


def magnitude(sparsity: float):
    def apply(handle, layers, calib) -> dict[str, Any]:
        tr = handle.transformer
        sample = calib.sample(0)
        total = _block_params(handle)
        attn = _attentions(handle)
        head_dim = {a: a.to_q.out_features // a.heads for a in attn}
        qkv = [lin for a in attn for lin in (a.to_q, a.to_k, a.to_v)]
        heads = {lin: a.heads for a in attn for lin in (a.to_q, a.to_k, a.to_v)}
        with torch.enable_grad():
            _prune(handle, sample, qkv, HEAD_RATIO, heads, HEAD_RATIO)
        for a in attn:  # the hand fix: the forward reads Attention.heads
            a.heads = a.to_q.out_features // head_dim[a]
            a.inner_dim = a.to_q.out_features
        left = sparsity * total - (total - _block_params(handle))
        ffs = _ffs(handle)
        ff = [m.net[0].proj for m in ffs]
        whole = sum(_channel_cost(m) * [x for x in m.net if isinstance(x, nn.Linear)][-1]
                    .in_features for m in ffs)
        ratio = min(max(left / whole, 0.0), 0.9)
        if ratio > 0:
            with torch.enable_grad():
                _prune(handle, sample, ff, ratio, {}, 0.0)
        return {"block_sparsity": round(1 - _block_params(handle) / total, 4),
                "heads_kept": [a.heads for a in attn][:4],
                "ff_channels_kept": [lin.out_features for lin in ff][:4],
                "params_after": sum(p.numel() for p in tr.parameters())}
    return apply
