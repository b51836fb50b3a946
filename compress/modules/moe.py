"""Mixture-of-experts feed-forward runtime: MoEIn and MoEOut, a pair standing for one FFN.

A dense feed-forward is ``out(act(in(x)))``. After ``to_moe`` its hidden channels are ordered
[shared | expert 0 | expert 1 | ...] (per half when the first layer is gated, [x | gate]), and

- ``MoEIn`` replaces the first layer (each layer reading the FFN input, when there are two:
  SwiGLU's w1 and w3): it routes every token to its top-k experts, runs the shared expert on all
  tokens and each expert's matmul only on the tokens routed to it, and scatters the results into
  the hidden tensor; channels of experts a token was not routed to stay zero.
- the model's own activation (and Sana's depthwise conv) runs on that hidden tensor unchanged.
- ``MoEOut`` replaces the last layer: the shared columns for all tokens, then each expert's
  columns only for its tokens, scaled by the token's gate and summed (index_add). Columns outside
  the FFN (FLUX single blocks' attention half of proj_out) stay a dense Linear.

Packed form (diffusers' FeedForward, whose activation module is known): ``MoEIn`` replaces the
whole activation module (``net.0``: its Linear and its GELU/GEGLU/SwiGLU), applies the
activation itself and returns the experts' hidden values packed into one flat tensor (shared
[T, h_s], then each expert's [n_e, h_e]); ``MoEOut`` reads them back. No hidden tensor of the
full width is built, filled or activated.

So every expert matmul runs on its own tokens only (no dense compute with masks); only the
element-wise activation sees the whole hidden width. Two exceptions run a dense masked form
(every expert on every token, zeroed where not chosen; same values): under torch.compile, whose
graphs need shapes that do not depend on the routing, and feed-forwards too small for the
sparse form's gathers to pay, chosen by timing (:mod:`compress.modules.moe_dense`). With all
experts chosen (top_k = experts) the pair computes exactly the dense FFN: the gate's value is
one, and the router learns through its gradient (straight-through: value 1, derivative that of
the softmax probability).

The router reads the token's FFN input and, optionally, the denoising timestep (sinusoidal
features through a zero-initialised Linear). The timestep comes from a forward pre-hook on the
transformer (:class:`TimeHook`), which also sorts the load statistics into timestep groups.
Routing state lives in a :class:`Route`, a plain object the pair shares (not a module: no
parameters of its own; it points at the router Linear held by the first MoEIn).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from compress.modules import moe_dense


def _glu(z: torch.Tensor, act) -> torch.Tensor:
    a, g = z.chunk(2, dim=-1)
    return a * act(g)


ACTIVATIONS = {  # what a packed MoEIn applies itself (diffusers' FeedForward activations)
    "gelu": lambda z: F.gelu(z),
    "gelu-tanh": lambda z: F.gelu(z, approximate="tanh"),
    "geglu": lambda z: _glu(z, F.gelu),
    "swiglu": lambda z: _glu(z, F.silu),
    "approx-gelu": lambda z: z * torch.sigmoid(1.702 * z),
    "silu": F.silu,
    "relu": F.relu,
    "mish": F.mish,
}
GROUPS = 4  # timestep groups of the load statistics: t/T in [0, .25), [.25, .5), ...
T_FEATURES = 16


class TimeContext:
    """The current call's per-sample timestep, as a fraction of the model's range [0, 1]."""

    def __init__(self) -> None:
        self.t: torch.Tensor | None = None
        self.raw_max = 0.0  # the largest timestep seen, before scaling (finds the range)
        # the routers' time features of the current call, shared by every MoE layer reading
        # this context: (t, tokens, samples, dtype, features); ``t`` is replaced each call
        self.features: tuple | None = None

    def token_features(self, tt: torch.Tensor, n: int, samples: int,
                       dtype: torch.dtype) -> torch.Tensor:
        """:func:`time_features` of the per-token times ``tt`` (from ``self.t``), computed once
        per call for all layers (the hook replaces ``self.t`` every call; it is never changed
        in place)."""
        if torch.compiler.is_compiling():
            return time_features(tt).to(dtype)
        hit = self.features
        if (hit is not None and hit[0] is self.t and hit[1] == n and hit[2] == samples
                and hit[3] == dtype and hit[4].device == tt.device):
            return hit[4]
        f = time_features(tt).to(dtype)
        self.features = (self.t, n, samples, dtype, f)
        return f


class TimeHook:
    """Forward pre-hook on the transformer: stores its timestep argument in a TimeContext.

    ``name``: the forward parameter holding the timestep (timestep, t, ...); ``scale``: the
    largest timestep of the model's range (1000, or 1 for FLUX's fractions)."""

    def __init__(self, ctx: TimeContext, name: str, position: int | None, scale: float) -> None:
        self.ctx, self.name, self.position, self.scale = ctx, name, position, scale

    def __call__(self, module, args, kwargs):
        t = kwargs.get(self.name)
        if t is None and self.position is not None and self.position < len(args):
            t = args[self.position]
        if isinstance(t, (int, float)):
            t = torch.tensor([float(t)])
        if isinstance(t, torch.Tensor) and t.numel():
            t = t.detach().float().flatten()
            self.ctx.raw_max = max(self.ctx.raw_max, float(t.max()))
            self.ctx.t = (t / self.scale).clamp(0, 1)
        else:
            self.ctx.t = None


def timestep_argument(module: nn.Module) -> tuple[str, int | None] | None:
    """(name, positional index) of the forward parameter carrying the timestep, or None."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for want in ("timestep", "timesteps", "t", "time", "sigma"):
        for i, p in enumerate(params):
            if p.name == want:
                pos = i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else None
                return want, pos
    return None


def time_context(transformer: nn.Module, name: str | None, position: int | None,
                 scale: float) -> TimeContext:
    """The transformer's TimeContext: its TimeHook's (one per transformer, shared by every MoE
    and block router in it), else a new one with a new hook (none when ``name`` is None)."""
    for h in transformer._forward_pre_hooks.values():
        if isinstance(h, TimeHook):
            return h.ctx
    ctx = TimeContext()
    if name is not None:
        transformer.register_forward_pre_hook(TimeHook(ctx, name, position, scale),
                                              with_kwargs=True)
    return ctx


def settle_scale(transformer: nn.Module) -> float:
    """Fix the transformer's TimeHook scale from the largest timestep it has seen (1 for
    models that take fractions, like FLUX; else 1000 or the largest seen) and return it."""
    for h in transformer._forward_pre_hooks.values():
        if isinstance(h, TimeHook):
            raw = h.ctx.raw_max
            h.scale = 1.0 if raw <= 1.0 else max(1000.0, raw)
            return h.scale
    return 1.0


def time_features(frac: torch.Tensor) -> torch.Tensor:
    """[T] fractions -> [T, 16] sinusoidal features (periods from 1/1000 to the whole range)."""
    half = T_FEATURES // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=frac.device) / half)
    ang = frac[:, None] * 1000.0 * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class Route:
    """Routing of the current call, shared by one FFN's MoEIn and MoEOut."""

    def __init__(self, experts: int, top_k: int, ctx: TimeContext | None) -> None:
        self.experts, self.top_k, self.ctx = experts, top_k, ctx
        self.router: nn.Linear | None = None
        self.t_router: nn.Linear | None = None
        self.expert_params = [0] * experts  # weights one token runs per expert (in + out)
        self.collect = False
        self.load = torch.zeros(GROUPS, experts, dtype=torch.float64)
        self.tokens = torch.zeros(GROUPS, dtype=torch.float64)
        self.balance: torch.Tensor | None = None
        self.mode: str | None = None  # "sparse" or "dense", chosen at the first inference call
        self.out: nn.Module | None = None  # the pair's MoEOut (for timing the whole pair)
        self.clear()

    def clear(self) -> None:
        self.src: tuple | None = None
        self.lead: tuple = ()
        self.tok: list[torch.Tensor] = []
        self.gate: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [T, experts] gates (dense form, compiling)

    def inactive_per_token(self) -> float | None:
        """Expert weights a token did NOT run, averaged over the tokens counted since
        :func:`collect` (None when none was counted)."""
        tokens = float(self.tokens.sum())
        if tokens == 0:
            return None
        run = float((self.load.sum(0) * torch.tensor(self.expert_params,
                                                      dtype=torch.float64)).sum())
        return sum(self.expert_params) - run / tokens

    def ready_for(self, x: torch.Tensor) -> bool:
        return self.src == (x.data_ptr(), tuple(x.shape))

    def _token_time(self, n: int, samples: int) -> torch.Tensor | None:
        t = self.ctx.t if self.ctx is not None else None
        if t is None or t.numel() == 0:
            return None
        if t.numel() == 1:
            return t.expand(n)
        if samples > 0 and t.numel() == samples and n % samples == 0:
            return t.repeat_interleave(n // samples)
        return t[:1].expand(n)

    def _logits(self, xt: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.router is None:
            raise RuntimeError("MoE route has no router (the MoEIn holding it was not built)")
        logits = self.router(xt).float()
        tt = self._token_time(xt.shape[0], samples)
        if self.t_router is not None and tt is not None:
            feats = self.ctx.token_features(tt.to(xt.device), xt.shape[0], samples, xt.dtype)
            logits = logits + self.t_router(feats).float()
        return logits, tt

    def compute_dense(self, xt: torch.Tensor, samples: int) -> None:
        """The same routing as a [T, experts] gate matrix (zero where an expert was not
        chosen): the form torch.compile traces, since its shapes do not depend on the data."""
        logits, tt = self._logits(xt, samples)
        top = logits.topk(self.top_k, dim=-1).indices
        mask = torch.zeros(xt.shape[0], self.experts, dtype=xt.dtype, device=xt.device)
        if torch.is_grad_enabled():
            chosen = logits.softmax(-1).gather(1, top)
            self.mask = mask.scatter(1, top, (1.0 + chosen - chosen.detach()).to(xt.dtype))
        else:  # the gates' value is one: without gradients only where they are counts
            self.mask = mask.scatter_(1, top, 1.0)
        if self.collect and not torch.compiler.is_compiling():
            self._count(top.reshape(-1), tt, xt.shape[0])

    def compute(self, x: torch.Tensor, xt: torch.Tensor, samples: int) -> None:
        """Route the [T, D] tokens ``xt`` (from ``samples`` samples) to their top-k experts."""
        n = xt.shape[0]
        logits, tt = self._logits(xt, samples)
        probs = logits.softmax(-1)
        top = logits.topk(self.top_k, dim=-1).indices
        chosen = probs.gather(1, top)
        gate = (1.0 + chosen - chosen.detach()).to(xt.dtype).reshape(-1)  # value 1 (to an ulp)
        flat = top.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.experts)
        toks = (order // self.top_k).split(counts.tolist())
        gates = gate[order].split(counts.tolist())
        self.tok, self.gate = list(toks), list(gates)
        self.src = (x.data_ptr(), tuple(x.shape))
        self.balance = None
        if torch.is_grad_enabled() and self.router.weight.requires_grad:
            frac = counts.to(probs.dtype) / flat.numel()  # Switch Transformer's balance loss
            self.balance = self.experts * (frac * probs.mean(0)).sum()
        if self.collect:
            self._count(flat, tt, n)

    def _count(self, flat: torch.Tensor, tt: torch.Tensor | None, n: int) -> None:
        grp = torch.zeros(n, dtype=torch.long) if tt is None else \
            (tt.cpu() * GROUPS).long().clamp(0, GROUPS - 1)
        self.tokens += torch.bincount(grp, minlength=GROUPS).double()
        key = grp.repeat_interleave(self.top_k) * self.experts + flat.cpu()
        self.load += torch.bincount(key, minlength=GROUPS * self.experts).double() \
            .view(GROUPS, self.experts)


def _tokens(x: torch.Tensor, conv: bool) -> tuple[torch.Tensor, int]:
    """[..., C] (or [B, C, H, W] for a conv layer) -> ([T, C], samples)."""
    if conv:
        return x.permute(0, *range(2, x.dim()), 1).reshape(-1, x.shape[1]), x.shape[0]
    return x.reshape(-1, x.shape[-1]), (x.shape[0] if x.dim() > 2 else 0)


def _untokens(y: torch.Tensor, like: torch.Tensor, conv: bool) -> torch.Tensor:
    if conv:
        spatial = like.shape[2:]
        y = y.view(like.shape[0], *spatial, y.shape[-1])
        return y.permute(0, y.dim() - 1, *range(1, y.dim() - 1))
    return y.view(*like.shape[:-1], y.shape[-1])


class MoEIn(nn.Module):
    """First layer(s) of an MoE feed-forward: routing, shared and expert input projections.

    ``hidden``: the FFN's hidden channels (shared + experts); ``parts``: 2 when the layer is
    gated ([x | gate] halves, each ordered [shared | experts]); ``conv``: the layer was a 1x1
    conv over [B, C, H, W] (Sana), its weights now Linear. The output has ``parts x hidden``
    channels, zero where a token's experts did not run."""

    def __init__(self, dim: int, shared: int, widths: list[int], parts: int, bias: bool,
                 route: Route, conv: bool = False, holds_router: bool = True,
                 time_router: bool = False, act: str | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        if act is not None and (act not in ACTIVATIONS or conv):
            raise ValueError(f"MoEIn: cannot pack activation {act!r} (conv={conv})")
        self.dim, self.parts, self.conv, self.act = dim, parts, conv, act
        self.shared_width, self.widths = shared, list(widths)
        self.hidden = shared + sum(widths)
        self.shared = nn.Linear(dim, parts * shared, bias=bias, **kw) if shared else None
        self.experts = nn.ModuleList(nn.Linear(dim, parts * w, bias=bias, **kw) for w in widths)
        self.route = route
        self.router = nn.Linear(dim, len(widths), **kw) if holds_router else None
        self.t_router = nn.Linear(T_FEATURES, len(widths), **kw) \
            if holds_router and time_router else None
        if holds_router:
            route.router, route.t_router = self.router, self.t_router
        for e, w in enumerate(widths):
            route.expert_params[e] += parts * w * (dim + int(bias))
        self._cols: dict[tuple, list[torch.Tensor]] = {}

    def _columns(self, device) -> list[torch.Tensor]:
        """Hidden-tensor columns of the shared expert then of each expert (every part)."""
        key = (str(device),)
        if key not in self._cols:
            starts = [0, self.shared_width]
            for w in self.widths:
                starts.append(starts[-1] + w)
            spans = [(0, self.shared_width)] + [(starts[i + 1], starts[i + 1] + w)
                                                for i, w in enumerate(self.widths)]
            self._cols[key] = [torch.cat([torch.arange(p * self.hidden + a, p * self.hidden + b)
                                          for p in range(self.parts)]).to(device)
                               for a, b in spans]
        return self._cols[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt, samples = _tokens(x, self.conv)
        route = self.route
        if torch.compiler.is_compiling():
            return self._dense(x, xt, samples)
        if not torch.is_grad_enabled():  # training always runs sparse (balance loss, gradients)
            if route.mode is None:
                route.mode = moe_dense.choose(self, x, xt, samples)
            if route.mode == "dense":
                return self._dense(x, xt, samples)
        if not route.ready_for(x):
            route.compute(x, xt, samples)
        if self.act is not None:
            return self._packed(x, xt)
        return self._scatter(x, xt)

    def _scatter(self, x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        route = self.route
        cols = self._columns(xt.device)
        dt = xt.dtype
        out = xt.new_zeros(xt.shape[0], self.parts * self.hidden)
        if self.shared is not None:
            out.index_copy_(1, cols[0], self.shared(xt).to(dt))
        for e, lin in enumerate(self.experts):
            tok = route.tok[e]
            if tok.numel() == 0:
                continue
            y = lin(xt.index_select(0, tok)).to(dt)
            out.index_put_((tok[:, None], cols[e + 1][None, :]), y)
        return _untokens(out, x, self.conv)

    def _dense(self, x: torch.Tensor, xt: torch.Tensor, samples: int) -> torch.Tensor:
        # Every expert on every token, zeroed where not chosen (moe_dense): under torch.compile
        # (static shapes) and on layers too small for the sparse form to pay. The same values
        # as the sparse form, not its saving; a packed activation is applied here.
        act = ACTIVATIONS[self.act] if self.act is not None else None
        return _untokens(moe_dense.forward_in(self, xt, samples, act), x, self.conv)

    def _packed(self, x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        act, route = ACTIVATIONS[self.act], self.route
        route.lead = tuple(x.shape[:-1])
        pieces = [act(self.shared(xt)).reshape(-1)] if self.shared is not None else []
        for e, lin in enumerate(self.experts):
            tok = route.tok[e]
            if tok.numel():
                pieces.append(act(lin(xt.index_select(0, tok))).reshape(-1))
        return torch.cat(pieces) if pieces else xt.new_zeros(0)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, shared={self.shared_width}, experts={self.widths}, "
                f"parts={self.parts}, top_k={self.route.top_k}, conv={self.conv}, "
                f"act={self.act}")


class MoEOut(nn.Module):
    """Last layer of an MoE feed-forward. Reads ``offset + hidden`` columns: the first
    ``offset`` (if any) go through the dense Linear ``rest`` (FLUX single blocks' attention
    half), the hidden ones per expert on its tokens only, scaled by the gate and summed."""

    def __init__(self, offset: int, shared: int, widths: list[int], out_dim: int, bias: bool,
                 route: Route, conv: bool = False, packed: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        if packed and (offset or conv):
            raise ValueError("MoEOut: a packed input has no dense columns and no conv layout")
        self.offset, self.out_dim, self.conv, self.packed = offset, out_dim, conv, packed
        self.shared_width, self.widths = shared, list(widths)
        self.rest = nn.Linear(offset, out_dim, bias=False, **kw) if offset else None
        self.shared = nn.Linear(shared, out_dim, bias=False, **kw) if shared else None
        self.experts = nn.ModuleList(nn.Linear(w, out_dim, bias=False, **kw) for w in widths)
        self.bias = nn.Parameter(torch.zeros(out_dim, **kw)) if bias else None
        self.route = route
        route.out = self
        for e, w in enumerate(widths):
            route.expert_params[e] += w * out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        route = self.route
        if route.mask is not None:
            return self._dense(h)
        if not route.tok:
            raise RuntimeError("MoEOut ran before its MoEIn routed the tokens")
        if self.packed:
            return self._packed(h)
        ht, _ = _tokens(h, self.conv)
        parts = []
        if self.rest is not None:
            parts.append(self.rest(ht[:, :self.offset]))
        a = self.offset
        if self.shared is not None:
            parts.append(self.shared(ht[:, a:a + self.shared_width]))
        a += self.shared_width
        y = sum(parts) if parts else ht.new_zeros(ht.shape[0], self.out_dim)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        for e, lin in enumerate(self.experts):
            w, tok = self.widths[e], route.tok[e]
            if tok.numel():
                z = lin(ht[:, a:a + w].index_select(0, tok))
                if torch.is_grad_enabled():  # the gate's value is one: only its gradient counts
                    z = z * route.gate[e][:, None]
                y.index_add_(0, tok, z.to(y.dtype))
            a += w
        route.clear()
        return _untokens(y, h, self.conv)

    def _dense(self, h: torch.Tensor) -> torch.Tensor:
        ht, _ = _tokens(h, self.conv)
        y = moe_dense.forward_out(self, ht, 0 if self.packed else self.offset)
        self.route.clear()
        return _untokens(y, h, self.conv)

    def _packed(self, flat: torch.Tensor) -> torch.Tensor:
        route = self.route
        n = sum(t.numel() for t in route.tok) // route.top_k
        a = n * self.shared_width
        if self.shared is not None:
            y = self.shared(flat[:a].view(n, self.shared_width))
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        elif self.bias is not None:
            y = self.bias.to(flat.dtype).expand(n, self.out_dim).clone()
        else:
            y = flat.new_zeros(n, self.out_dim)
        for e, lin in enumerate(self.experts):
            w, tok = self.widths[e], route.tok[e]
            if tok.numel():
                z = lin(flat[a:a + tok.numel() * w].view(tok.numel(), w))
                if torch.is_grad_enabled():  # the gate's value is one: only its gradient counts
                    z = z * route.gate[e][:, None]
                y.index_add_(0, tok, z.to(y.dtype))
                a += tok.numel() * w
        lead = route.lead
        route.clear()
        return y.view(*lead, self.out_dim)

    def extra_repr(self) -> str:
        return (f"offset={self.offset}, shared={self.shared_width}, experts={self.widths}, "
                f"out={self.out_dim}, conv={self.conv}, packed={self.packed}")


# ----------------------------------------------------------------------------- statistics


def routes(transformer: nn.Module) -> list[tuple[str, Route]]:
    """(name of the router-holding MoEIn, its Route) for every MoE feed-forward."""
    return [(n, m.route) for n, m in transformer.named_modules()
            if isinstance(m, MoEIn) and m.router is not None]


def collect(transformer: nn.Module, on: bool = True) -> None:
    """Start (resetting the counts) or stop counting tokens per expert."""
    for _, r in routes(transformer):
        r.collect = on
        if on:
            r.load.zero_()
            r.tokens.zero_()


def load_report(transformer: nn.Module) -> dict:
    """Tokens per expert (all layers summed, and per timestep group), the load balance (the
    busiest expert's share over the fair share, averaged over layers: 1.0 is perfect)."""
    rs = routes(transformer)
    if not rs or not any(float(r.tokens.sum()) for _, r in rs):
        return {}
    per_layer, imbalance = {}, []
    for name, r in rs:
        tot = r.load.sum(0)
        if tot.sum() == 0:
            continue
        share = tot / tot.sum()
        imbalance.append(float(share.max()) * r.experts)
        per_layer[name] = [round(float(s), 4) for s in share]
    groups = {}
    for g in range(GROUPS):
        load = sum(r.load[g] for _, r in rs)
        if float(load.sum()) > 0:
            groups[f"t {g / GROUPS:.2f}-{(g + 1) / GROUPS:.2f}"] = \
                [round(float(v / load.sum()), 4) for v in load]
    return {"share_per_layer": per_layer, "share_per_timestep_group": groups,
            "max_over_fair_mean": round(sum(imbalance) / len(imbalance), 4),
            "max_over_fair_worst": round(max(imbalance), 4)}


def balance_loss(transformer: nn.Module) -> torch.Tensor | None:
    """Mean Switch balance loss of the routers that ran since the last call (None without MoE
    or grad). Consumed: a router in a block the call skipped (routed blocks) adds nothing, not
    its loss from an earlier call."""
    terms = []
    for _, r in routes(transformer):
        if r.balance is not None:
            terms.append(r.balance)
            r.balance = None
    return torch.stack(terms).mean() if terms else None


__all__ = [
    "MoEIn",
    "MoEOut",
    "Route",
    "TimeContext",
    "TimeHook",
    "balance_loss",
    "collect",
    "load_report",
    "routes",
    "settle_scale",
    "time_context",
    "time_features",
    "timestep_argument",
]
