"""Where the heads and feed-forward channels of a transformer live: the width units.

A unit is one attention (its heads) or one feed-forward (its hidden channels). It names the
layers whose output rows are per element (q, k, v and the joint text stream's add_*_proj; the
first feed-forward layer, two halves when gated; FLUX single blocks' proj_mlp; Sana's
GLUMBConv expansion and depthwise convs), the layers whose input columns are per element (the
out-projections; the last feed-forward layer; FLUX single blocks' proj_out, whose input is
[attention | mlp] so the mlp unit starts at a column offset), and norms spanning all heads.

diffusers families are read by module type (diffusers' Attention / FluxAttention, FeedForward,
GLUMBConv, FluxSingleTransformerBlock), so DiT, PixArt, SD3/3.5, FLUX and Sana share one path.
A user's own module (generic adapter) is read from the roles its traced structure gives: the
attention and feed-forward layers of each block, grouped by the module holding them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from compress.errors import UserError
from compress.models.base import FamilyAdapter

HEAD_ATTRS = ("heads", "num_heads", "n_heads", "nhead", "num_attention_heads")
HEAD_DIM_ATTRS = ("head_dim", "dim_head", "attention_head_dim")
_QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
_QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


@dataclass
class Unit:
    """One prunable group of heads (kind "heads") or hidden channels (kind "channels").

    count: heads or channels now; group: rows/columns per element (head_dim, or 1).
    outputs: layers whose output rows are per element; inputs: layers whose input columns are.
    sized: modules (norms) whose parameters span count x group along their first dimension.
    parts: layer -> how many stacked copies of the count x group rows it has (2: the two halves
        of a gated layer, 3: a fused [q | k | v] layer); 1 when not listed.
    offset: input layer -> the column where this unit's elements start (FLUX single blocks'
        proj_out reads [attention | mlp]); 0 when not listed.
    owner, attr: the module and attribute that hold ``count`` (Attention.heads, ...), if any.
    exact: False when removal changes what the kept elements compute (a norm across heads).
    """

    name: str
    kind: str
    block: str
    count: int
    group: int
    outputs: list[str]
    inputs: list[str]
    sized: list[str] = field(default_factory=list)
    parts: dict[str, int] = field(default_factory=dict)
    offset: dict[str, int] = field(default_factory=dict)
    owner: str | None = None
    attr: str | None = None
    exact: bool = True


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if name else prefix


def _linear(m: nn.Module, attr: str) -> nn.Linear | None:
    x = getattr(m, attr, None)
    return x if isinstance(x, nn.Linear) else None


# ----------------------------------------------------------------------------- diffusers


def _attention(tr: nn.Module, name: str, m: nn.Module, block: str, bmod: nn.Module) -> Unit:
    if getattr(m, "fused_projections", False) or hasattr(m, "to_qkv"):
        raise UserError(f"width: {name} has fused q/k/v projections; call the transformer's "
                        "unfuse_qkv_projections() before pruning heads")
    heads, inner = int(m.heads), m.to_q.out_features
    if heads < 1 or inner % heads:
        raise UserError(f"width: {name} has {inner} q rows for {heads} heads; cannot split it")
    outputs = []
    for attr in _QKV:
        lin = _linear(m, attr)
        if lin is None:
            continue
        if lin.out_features != inner:
            raise UserError(f"width: {name}.{attr} has {lin.out_features} rows, not the "
                            f"{inner} of to_q (grouped key/value heads); not supported")
        outputs.append(f"{name}.{attr}")
    unit = Unit(name, "heads", block, heads, inner // heads, outputs, [], owner=name, attr="heads")
    out = getattr(m, "to_out", None)
    if isinstance(out, nn.ModuleList) and isinstance(out[0], nn.Linear):
        unit.inputs.append(f"{name}.to_out.0")
    if _linear(m, "to_add_out") is not None:
        unit.inputs.append(f"{name}.to_add_out")
    if not unit.inputs and getattr(bmod, "attn", None) is m and _linear(bmod, "proj_out"):
        unit.inputs.append(f"{block}.proj_out")  # FLUX single block: [attention | mlp] input
    if not unit.inputs:
        raise UserError(f"width: found no output projection of {name}; it cannot be pruned")
    for attr in _QK_NORMS:  # per-head norms (over head_dim) stay; norms across heads shrink
        norm = getattr(m, attr, None)
        w = getattr(norm, "weight", None)
        if w is not None and w.ndim == 1 and w.shape[0] == inner and heads > 1:
            unit.sized.append(f"{name}.{attr}")
            unit.exact = False
    for i in unit.inputs:
        if tr.get_submodule(i).in_features < inner:
            raise UserError(f"width: {i} reads fewer columns than {name} has rows")
    return unit


def _feedforward(name: str, m: nn.Module, block: str) -> Unit | None:
    """diffusers FeedForward: net[0].proj (GELU/GEGLU/SwiGLU/...) then the net's last Linear."""
    proj = getattr(m.net[0], "proj", None)
    last = [x for x in m.net if isinstance(x, nn.Linear)]
    if not isinstance(proj, nn.Linear) or not last:
        return None
    hidden = last[-1].in_features
    idx = next(i for i, x in enumerate(m.net) if x is last[-1])
    if proj.out_features % hidden or proj.out_features // hidden not in (1, 2):
        raise UserError(f"width: {name} expands to {proj.out_features} channels but its output "
                        f"layer reads {hidden}; cannot pair them")
    parts = proj.out_features // hidden
    return Unit(name, "channels", block, hidden, 1, [f"{name}.net.0.proj"], [f"{name}.net.{idx}"],
                parts={f"{name}.net.0.proj": parts} if parts > 1 else {})


def _glumbconv(name: str, m: nn.Module, block: str) -> Unit:
    """Sana's GLUMBConv: 1x1 expand to 2 x hidden, depthwise 3x3, [x | gate] GLU, 1x1 back."""
    hidden = m.conv_point.in_channels
    inv, dep = m.conv_inverted, m.conv_depth
    if 2 * hidden != inv.out_channels or {dep.groups, dep.out_channels} != {2 * hidden}:
        raise UserError(f"width: {name} is not a GLUMBConv of 2 x {hidden} channels")
    outs = [f"{name}.conv_inverted", f"{name}.conv_depth"]
    return Unit(name, "channels", block, hidden, 1, outs, [f"{name}.conv_point"],
                parts=dict.fromkeys(outs, 2))


def diffusers_units(tr: nn.Module, adapter: FamilyAdapter) -> list[Unit]:
    out: list[Unit] = []
    for block, bmod in adapter.blocks(tr):
        for sub, m in bmod.named_modules():
            name = _join(block, sub)
            if hasattr(m, "heads") and isinstance(getattr(m, "to_q", None), nn.Linear):
                out.append(_attention(tr, name, m, block, bmod))
            elif isinstance(getattr(m, "net", None), nn.ModuleList) and len(m.net):
                u = _feedforward(name, m, block)
                if u is not None:
                    out.append(u)
            elif all(isinstance(getattr(m, a, None), nn.Conv2d)
                     for a in ("conv_inverted", "conv_depth", "conv_point")):
                out.append(_glumbconv(name, m, block))
        mlp, proj = _linear(bmod, "proj_mlp"), _linear(bmod, "proj_out")
        attn = getattr(bmod, "attn", None)
        if mlp is not None and proj is not None and attn is not None:  # FLUX single block
            inner = attn.to_q.out_features
            if proj.in_features != inner + mlp.out_features:
                raise UserError(f"width: {block}.proj_out reads {proj.in_features} columns, not "
                                f"attention {inner} + mlp {mlp.out_features}")
            out.append(Unit(f"{block}.mlp", "channels", block, mlp.out_features, 1,
                            [f"{block}.proj_mlp"], [f"{block}.proj_out"],
                            offset={f"{block}.proj_out": inner}, owner=block,
                            attr="mlp_hidden_dim"))
    return out


# ----------------------------------------------------------------------------- generic


def _positive(mod: nn.Module, attr: str) -> int | None:
    v = getattr(mod, attr, None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _head_count(tr: nn.Module, unit_name: str, parent: str, block: str, inner: int,
                head_counts: dict[str, int]) -> tuple[int, str | None, str | None]:
    """(heads, owner module, attribute) from head_counts, else from a head-count attribute (or
    a head-width one: heads = inner / head_dim) on the module holding the layers or above it,
    up to the block."""
    for fits in (lambda k: k == unit_name, lambda k: k == parent,
                 lambda k: k.startswith("re:") and re.fullmatch(k[3:], parent) is not None):
        hit = [n for k, n in head_counts.items() if fits(k)]
        if hit:
            return int(hit[0]), None, None
    path = parent
    while True:
        mod = tr.get_submodule(path) if path else tr
        for attr in HEAD_ATTRS:
            if _positive(mod, attr):
                return _positive(mod, attr), path, attr
        for attr in HEAD_DIM_ATTRS:
            width = _positive(mod, attr)
            if width and inner % width == 0:
                return inner // width, None, None
        if path == block or not path.startswith(block):
            break
        path = path.rpartition(".")[0]
    raise UserError(
        f"width: cannot tell how many heads the attention in {parent or 'the model'} (unit "
        f"{unit_name}) has: no attribute {', '.join(HEAD_ATTRS + HEAD_DIM_ATTRS)} on it or up "
        f'to its block {block}; give it in the recipe: prune_width.heads: {{"{parent}": N}} '
        "(or the unit name, or a 're:' regex over module names)")


def generic_units(tr: nn.Module, adapter: FamilyAdapter,
                  head_counts: dict[str, int]) -> list[Unit]:
    from compress.models.generic import structure_of

    st = structure_of(tr)
    groups: dict[tuple[str, str], dict[str, list[str]]] = {}
    block_of: dict[str, str] = {}
    for name, mod, role in adapter.weight_layers(tr):
        block = next((b for b in st.blocks if name.startswith(b + ".")), None)
        if block is None or not isinstance(mod, nn.Linear):
            continue
        parent = name.rpartition(".")[0]
        if role in ("attn_qkv", "attn_out"):
            key, side = (parent, "attn"), ("in" if role == "attn_out" else "out")
        elif role == "cross_attn":
            took = st.reasons.get(name, "").startswith("takes the output")
            key, side = (parent, "cross_attn"), ("in" if took else "out")
        elif role in ("ff_in", "ff_out"):
            key, side = (parent, "ff"), ("in" if role == "ff_out" else "out")
        else:
            continue
        groups.setdefault(key, {"out": [], "in": []})[side].append(name)
        block_of[parent] = block
    out: list[Unit] = []
    for (parent, what), sides in groups.items():
        block = block_of[parent]
        name = f"{parent}.{what}" if parent == block else parent
        if not sides["out"] or not sides["in"]:
            continue  # half a unit (e.g. a layer between two non-linearities): nothing to pair
        widths = {tr.get_submodule(n).in_features for n in sides["in"]}
        if len(widths) != 1:
            raise UserError(f"width: {name}'s output layers {sides['in']} read different widths "
                            f"{sorted(widths)}; cannot pair them")
        inner = widths.pop()
        parts = {}
        for n in sides["out"]:
            rows = tr.get_submodule(n).out_features
            if rows % inner or rows // inner not in ((1, 2, 3) if what != "ff" else (1, 2)):
                raise UserError(f"width: {n} has {rows} rows, not a multiple 1-3 of the {inner} "
                                f"columns {sides['in'][0]} reads; cannot pair them")
            if rows // inner > 1:
                parts[n] = rows // inner
        if what == "ff":
            out.append(Unit(name, "channels", block, inner, 1, sides["out"], sides["in"],
                            parts=parts))
            continue
        heads, owner, attr = _head_count(tr, name, parent, block, inner, head_counts)
        if inner % heads:
            raise UserError(f"width: {name} has {inner} channels for {heads} heads; give the "
                            f'right count in the recipe: prune_width.heads: {{"{parent}": N}}')
        out.append(Unit(name, "heads", block, heads, inner // heads, sides["out"], sides["in"],
                        parts=parts, owner=owner, attr=attr))
    return out
