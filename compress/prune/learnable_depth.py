"""Learnable depth pruning in the way of TinyFusion: blocks split into local groups, one
categorical choice per group over which of its blocks to drop, sampled with a straight-through
Gumbel-softmax whose temperature is annealed, trained jointly with low-rank adapters (which
stand in for how well each choice recovers after fine-tuning) against the original model's
outputs. The most probable choice of every group is kept at the end.

A dropped block passes its input stream through: each output tensor becomes
``x + m * (f(x) - x)`` with ``x`` the input tensor it updates (see depth_scores.pair_streams)
and ``m`` the block's hard 0/1 mask, whose gradient reaches the group's logits.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.trace import tensors_in
from compress.prune.depth_scores import map_float_tensors


def split_groups(n: int, size: int, remove: int) -> list[tuple[list[int], int]]:
    """Consecutive groups of ``size`` positions (the last may be shorter) and how many to
    drop in each, ``remove`` in all, spread in proportion to the group lengths."""
    groups = [list(range(a, min(a + size, n))) for a in range(0, n, size)]
    exact = [len(g) * remove / n for g in groups]
    take = [math.floor(e) for e in exact]
    order = sorted(range(len(groups)), key=lambda i: (take[i] - exact[i], i))
    for i in order[: remove - sum(take)]:
        take[i] += 1
    return [(g, min(t, len(g) - 1)) for g, t in zip(groups, take)]


class GroupChoice(nn.Module):
    """Logits over the ways to drop ``drop`` of a group's removable blocks."""

    def __init__(self, blocks: list[str], drop: int, removable: set[str]) -> None:
        super().__init__()
        cand = [b for b in blocks if b in removable]
        self.blocks = blocks
        self.options = [set(c) for c in itertools.combinations(cand, drop)] or [set()]
        self.logits = nn.Parameter(torch.zeros(len(self.options)))

    def masks(self, tau: float, gen: torch.Generator | None) -> dict[str, torch.Tensor]:
        """Straight-through hard sample: 1 for blocks kept by the sampled option."""
        u = torch.rand(len(self.options), generator=gen).clamp(1e-9, 1 - 1e-9)
        g = -torch.log(-torch.log(u))
        y = F.softmax((self.logits + g) / tau, dim=0)
        hard = F.one_hot(y.argmax(), len(self.options)).to(y.dtype)
        y = hard - y.detach() + y
        return {b: 1 - sum(y[k] for k, o in enumerate(self.options) if b in o)
                for b in self.blocks}

    def best(self) -> set[str]:
        return self.options[int(self.logits.argmax())]

    def probs(self) -> list[float]:
        return F.softmax(self.logits.detach(), 0).tolist()


class MaskedBlocks:
    """Forward hooks that blend each block's output streams with its inputs by its mask."""

    def __init__(self, root: nn.Module, pairing: dict[str, list[int | None]]) -> None:
        self.mask: dict[str, torch.Tensor] = {}
        self._h = []
        for b, pairs in pairing.items():
            def hook(_m, args, kwargs, out, _b=b, _pairs=pairs):
                m = self.mask.get(_b)
                if m is None:
                    return out
                ins = [t for t in tensors_in((args, kwargs)) if t.is_floating_point()]

                def blend(k, o):
                    j = _pairs[k] if k < len(_pairs) else None
                    if j is None:
                        return o
                    x = ins[j]
                    return x + m.to(o.dtype) * (o - x)

                return map_float_tensors(out, blend)

            self._h.append(root.get_submodule(b).register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self._h:
            h.remove()
        self._h.clear()


def temperature(step: int, steps: int, start: float, end: float) -> float:
    """Exponential annealing from ``start`` to ``end`` over the run."""
    t = step / max(steps - 1, 1)
    return start * (end / start) ** t


def default_group(n: int, remove: int) -> int:
    """The smallest group size in which the removal ratio drops whole blocks."""
    for g in range(2, n + 1):
        if (g * remove) % n == 0 and g * remove // n >= 1:
            return g
    return max(2, round(n / max(remove, 1)))


def learn(handle, samples, blocks: list[str], pairing: dict[str, list[int | None]],
          targets: dict[str, int], removable: set[str], cfg, report: dict) -> list[str]:
    """Train the group choices (and adapters) and return the blocks to remove."""
    from compress.modules.swap import set_submodule
    from compress.train import batches
    from compress.train.kd import LoRALinear, add_lora, containers, per_sample
    from compress.train.loop import TrainSettings, batch_indices, info_of, train

    lc = cfg.learnable
    tr, ad = handle.transformer, handle.adapter
    dev = handle.run.get("device", "cpu")
    data = [samples.sample(i).to(dev) for i in range(len(samples))]
    with torch.no_grad():
        refs = [ad.call(tr, s.args, s.kwargs).detach() for s in data]
    choices: list[GroupChoice] = []
    for cont, names in containers(blocks).items():
        if targets.get(cont, 0) == 0:
            continue
        g = lc.group_size or default_group(len(names), targets[cont])
        for pos, drop in split_groups(len(names), g, targets[cont]):
            if drop:
                choices.append(GroupChoice([names[p] for p in pos], drop, removable))
    in_groups = [b for c in choices for b in c.blocks]
    lin = [f"{b}.{n}" for b in in_groups for n, m in tr.get_submodule(b).named_modules()
           if isinstance(m, nn.Linear)]
    params = [(f"choice.{k}", c.logits) for k, c in enumerate(choices)]
    lora = add_lora(tr, lin, lc.lora_rank, lc.lora_rank, cfg.seed) if lc.lora_rank else []
    masked = MaskedBlocks(tr, {b: pairing[b] for b in in_groups})
    tau = [lc.tau_start]

    stacked = batches.stacking_works(lambda a, k: ad.call(tr, a, k), data[:3])

    def loss_fn(idx: list[int], step: int):
        # one draw of the Gumbel noise per step, from the step's global batch (not the samples
        # a process holds), so that every process masks alike and N processes train as one
        first = batch_indices(len(data), step, s)[0]
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step * 100_003 + first)
        masks = {}
        for c in choices:
            masks.update(c.masks(tau[0], gen))
        masked.mask = masks
        smps = [data[i] for i in idx]
        st = batches.stack(smps) if stacked else None
        todo = [(st, torch.cat([refs[i] for i in idx]), batches.sizes(smps))] if st is not None \
            else [((s.args, s.kwargs), refs[i], None) for s, i in zip(smps, idx)]
        losses = []
        for (a, kw), ref, rows in todo:
            w = len(rows) if rows else 1
            losses.append(per_sample(ad.call(tr, a, kw), ref, None, rows) * w)
        return torch.stack(losses).sum() / len(idx), {}

    def on_step(step: int) -> None:
        tau[0] = temperature(step, lc.steps, lc.tau_start, lc.tau_end)

    ckpt = handle.run.get("checkpoints")
    s = TrainSettings(steps=lc.steps, batch=lc.batch, lr=lc.lr, grad_clip=None, seed=cfg.seed,
                      checkpoint_every=lc.checkpoint_every, min_lr_ratio=1.0)
    try:
        tr.requires_grad_(False)
        for _, p in params + lora:
            p.requires_grad_(True)
        res = train(params + lora, loss_fn, len(data), s,
                    ckpt_dir=(ckpt / f"pass{handle.run.get('pass_index', 0)}-learnable"
                              if ckpt is not None else None),
                    resume=bool(handle.run.get("resume")), desc="prune_depth learnable",
                    tag=",".join(in_groups), on_step=on_step,
                    lr_mult={n: lc.lora_lr / lc.lr for n, _ in lora})
    finally:
        masked.remove()
        for n, m in list(tr.named_modules()):
            if isinstance(m, LoRALinear):  # the adapters only judged recoverability: dropped
                set_submodule(tr, n, m.base)
        tr.requires_grad_(True)
    report["learnable"] = {
        "groups": [{"blocks": c.blocks, "remove": sorted(c.best()),
                    "probability": round(max(c.probs()), 4)} for c in choices],
        **info_of(res, s)}
    return sorted({b for c in choices for b in c.best()}, key=blocks.index)
