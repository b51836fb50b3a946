"""Mixture of Blocks runtime: per sample, only some blocks of each group run.

Consecutive blocks form groups of ``size``; a group's router reads the hidden state entering
the group (mean over tokens) and, optionally, the timestep, and picks the ``keep`` blocks each
sample runs. A block a sample skips passes its inputs through unchanged (what removing it would
do); a block runs on the sub-batch of the samples that chose it (its tensor arguments sliced
along the batch), so skipped samples cost nothing. The chosen blocks' outputs carry a
straight-through gate: value exactly one (with every block kept the model is the dense one),
gradient that of the router's softmax probability, so the router learns in distillation.

Blocks keep their names and parameters: the runtime swaps each routed block's class for a
subclass whose forward routes (made once per block class), and the routers live in
``transformer.block_routers``. The per-call routing state is a plain :class:`BlockGroup` the
blocks of a group share.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.modules.moe import GROUPS, TimeContext, time_features


class BlockGroup:
    """Routing of one group of blocks for the current call."""

    def __init__(self, size: int, keep: int, router: nn.Linear, ctx: TimeContext | None,
                 time_dims: int) -> None:
        self.size, self.keep, self.router, self.ctx = size, keep, router, ctx
        self.time_dims = time_dims
        self.explore = 0.0  # scale of Gumbel noise on the choice (distill sets it while training)
        self.forced: list[int] | None = None  # positions every sample skips (route_blocks' fit)
        self.seen: list[torch.Tensor] | None = None  # router inputs recorded (route_blocks' fit)
        self.rows: list[torch.Tensor] = []
        self.gate: list[torch.Tensor] = []
        self.batch = 0
        self.collect = False
        self.runs = torch.zeros(GROUPS, size, dtype=torch.float64)
        self.samples = torch.zeros(GROUPS, dtype=torch.float64)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The router's input for each sample (token mean of ``x``, then the timestep's
        features), and the samples' timesteps in [0, 1] (None if unknown)."""
        b = x.shape[0]
        feats = x.reshape(b, -1, x.shape[-1]).float().mean(1)
        t = self.ctx.t if self.ctx is not None else None
        if t is not None:
            t = t.expand(b) if t.numel() == 1 else t if t.numel() == b else t[:1].expand(b)
        if self.time_dims:
            tt = t if t is not None else torch.zeros(b)
            feats = torch.cat([feats, time_features(tt.to(x.device))], dim=1)
        return feats, t

    def decide(self, x: torch.Tensor) -> None:
        b = x.shape[0]
        feats, t = self.features(x)
        if self.seen is not None:
            self.seen.append(feats.detach())
        if self.forced is not None:  # route_blocks' fit: every sample skips these positions
            logits = torch.zeros(b, self.size, device=x.device)
            logits[:, self.forced] = -1.0
        else:
            logits = self.router(feats.to(self.router.weight.dtype)).float()
        probs = logits.softmax(-1)
        pick = logits
        if self.explore and torch.is_grad_enabled():
            # training: Gumbel noise on the choice, so other blocks get tried and the router
            # hears, through the gate's gradient, whether they would have served better
            u = torch.rand(logits.shape, device=logits.device).clamp(1e-9, 1 - 1e-9)
            pick = logits - self.explore * torch.log(-torch.log(u))
        top = pick.topk(self.keep, dim=-1).indices  # [B, keep]
        chosen = torch.zeros(b, self.size, dtype=torch.bool, device=x.device)
        chosen.scatter_(1, top, True)
        gate = probs - probs.detach()  # value zero: added as gate x (out - in)
        self.rows = [torch.nonzero(chosen[:, j]).flatten() for j in range(self.size)]
        self.gate = [gate[r, j] for j, r in enumerate(self.rows)]
        self.batch = b
        if self.collect:
            grp = torch.zeros(b, dtype=torch.long) if t is None else \
                (t.cpu() * GROUPS).long().clamp(0, GROUPS - 1)
            self.samples += torch.bincount(grp, minlength=GROUPS).double()
            for j in range(self.size):
                self.runs[:, j] += torch.bincount(grp[chosen[:, j].cpu()],
                                                  minlength=GROUPS).double()


def _slice(obj, rows: torch.Tensor, batch: int):
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, rows.to(obj.device)) \
            if obj.dim() >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(_slice(o, rows, batch) for o in obj)
    if isinstance(obj, list):
        return [_slice(o, rows, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice(v, rows, batch) for k, v in obj.items()}
    return obj


def _pick(args: tuple, kwargs: dict, key: str):
    kind, _, name = key.partition(":")
    return args[int(name)] if kind == "arg" else kwargs[name]


def _main_input(args: tuple, kwargs: dict) -> torch.Tensor:
    x = kwargs.get("hidden_states")
    if x is None and args:
        x = args[0]
    return x


class RoutedMixin:
    """The forward of a routed block (mixed into a subclass of the block's own class).

    ``_mob``: (group, position in it, template) where template lists, for each tensor the
    block returns, the input key ("arg:i" / "kw:name") it updates, and whether it returns a
    tuple."""

    def forward(self, *args, **kwargs):
        group, pos, tmpl = self._mob
        if pos == 0:
            group.decide(_main_input(args, kwargs))
        if not group.rows:
            raise RuntimeError("routed block ran before the first block of its group decided")
        rows, gate, b = group.rows[pos], group.gate[pos], group.batch
        ins = [None if k is None else _pick(args, kwargs, k) for k in tmpl["inputs"]]
        if rows.numel() == b:
            out = super().forward(*args, **kwargs)
            outs = list(out) if tmpl["tuple"] else [out]
            outs = [None if i is None else
                    o + gate.view(-1, *[1] * (o.dim() - 1)).to(o.dtype) * (o - i)
                    for o, i in zip(outs, ins)]
        else:
            outs = [None if i is None else i.clone() for i in ins]
            if rows.numel():
                sub = super().forward(*_slice(args, rows, b), **_slice(kwargs, rows, b))
                subs = list(sub) if tmpl["tuple"] else [sub]
                for full, o, i in zip(outs, subs, ins):
                    if i is None:
                        continue
                    ii = i.index_select(0, rows)
                    g = gate.view(-1, *[1] * (o.dim() - 1)).to(o.dtype)
                    full.index_copy_(0, rows, o + g * (o - ii))
        if pos == group.size - 1:
            group.rows, group.gate = [], []
        return tuple(outs) if tmpl["tuple"] else outs[0]


_CLASSES: dict[type, type] = {}


def routed_class(base: type) -> type:
    if issubclass(base, RoutedMixin):
        return base
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Routed{base.__name__}", (RoutedMixin, base), {})
    return _CLASSES[base]


def install(transformer: nn.Module, groups: list[list[str]], keep: int, templates: dict,
            dim: int, time_router: bool, ctx: TimeContext | None,
            device=None, dtype=None) -> list[BlockGroup]:
    """Route the named blocks in groups; routers in ``transformer.block_routers``."""
    from compress.modules.moe import T_FEATURES

    tdims = T_FEATURES if time_router else 0
    routers = nn.ModuleList(nn.Linear(dim + tdims, len(g), device=device, dtype=dtype)
                            for g in groups)
    transformer.block_routers = routers
    out = []
    for g, names in enumerate(groups):
        grp = BlockGroup(len(names), keep, routers[g], ctx, tdims)
        for pos, name in enumerate(names):
            blk = transformer.get_submodule(name)
            blk.__class__ = routed_class(type(blk))
            blk._mob = (grp, pos, templates[name])
        out.append(grp)
    return out


def block_groups(transformer: nn.Module) -> list[tuple[list[str], BlockGroup]]:
    found: dict[int, tuple[list[str], BlockGroup]] = {}
    for name, m in transformer.named_modules():
        if isinstance(m, RoutedMixin):
            grp = m._mob[0]
            found.setdefault(id(grp), ([], grp))[0].append(name)
    return list(found.values())


def explore(transformer: nn.Module, scale: float) -> None:
    """Gumbel noise of this scale on the routed blocks' choices while their routers train
    (0: none, each sample runs its router's choice)."""
    for _, g in block_groups(transformer):
        g.explore = float(scale)


def collect(transformer: nn.Module, on: bool = True) -> None:
    for _, g in block_groups(transformer):
        g.collect = on
        if on:
            g.runs.zero_()
            g.samples.zero_()


def run_fractions(transformer: nn.Module) -> dict[str, float] | None:
    """Block name -> the fraction of samples that ran it since :func:`collect` (None when no
    sample was counted); blocks outside any group are not listed (they always run)."""
    out = {}
    for names, g in block_groups(transformer):
        n = float(g.samples.sum())
        if n == 0:
            return None
        for j, name in enumerate(names):
            out[name] = float(g.runs[:, j].sum()) / n
    return out


def inactive_params(transformer: nn.Module) -> float | None:
    """Weights a token does not run, averaged over the counted run: skipped blocks' weights,
    and inside the blocks it ran, the experts it was not routed to (see modules.moe)."""
    from compress.modules import moe

    fr = run_fractions(transformer) if block_groups(transformer) else {}
    if fr is None:
        return None
    total = 0.0
    for name, f in fr.items():
        total += (1 - f) * sum(p.numel() for p in transformer.get_submodule(name).parameters())
    for name, r in moe.routes(transformer):
        per_token = r.inactive_per_token()
        if per_token is None:
            if fr.get(_block_of(name, fr), 1.0) == 0:
                continue  # its block never ran: all of it is counted above
            return None
        total += fr.get(_block_of(name, fr), 1.0) * per_token
    return total


def _block_of(name: str, blocks: dict) -> str | None:
    return next((b for b in blocks if name.startswith(b + ".")), None)


def load_report(transformer: nn.Module) -> dict:
    groups = block_groups(transformer)
    fr = run_fractions(transformer) if groups else None
    if not fr:
        return {}
    per_t = {}
    for gi in range(GROUPS):
        row = {}
        for names, g in groups:
            n = float(g.samples[gi])
            if n:
                row.update({name: round(float(g.runs[gi, j]) / n, 4)
                            for j, name in enumerate(names)})
        if row:
            per_t[f"t {gi / GROUPS:.2f}-{(gi + 1) / GROUPS:.2f}"] = row
    return {"run_fraction": {k: round(v, 4) for k, v in fr.items()},
            "run_fraction_per_timestep_group": per_t}
