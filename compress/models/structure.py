"""The structure of any nn.Module, found rather than guessed from names.

Blocks: the repeated sibling modules of one class that hold weight layers, at any depth and in
any container (``ModuleList``, ``Sequential``, plain attributes, several stacks such as double-
and single-stream blocks), ordered as one forward call runs them. Roles: read from the data
flow of that call (``compress.models.trace``): which layers feed a softmax attention and which
take its output, which feed a non-linearity and which take it, which see one row per sample
(the conditioning vector) and modulate a normalisation, which cross-attend to a sequence of
another length; outside the blocks, by position (embedders before them, the head after).
Names are only a fallback for layers the trace says nothing about, and a :class:`ModelSpec`
overrides both. Each role comes with the reason it was given.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from compress.models.trace import FlowTrace, trace_call

WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MIN_SHARE = 0.05  # a stack holds at least this share of the model's layer weights
_PAIR_SHARE = 0.15  # ... and a stack of only two members at least this share
_INNER_SHARE = 0.9  # an inner stack holding this much of an outer one's weights is preferred


@dataclass
class Structure:
    """What was found: blocks in execution order, a role and its reason per weight layer."""

    blocks: list[str]
    stacks: list[str]
    roles: dict[str, str]
    reasons: dict[str, str]
    traced: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": list(self.blocks), "stacks": list(self.stacks), "traced": self.traced,
                "roles": dict(self.roles), "reasons": dict(self.reasons), "notes": self.notes}


def _layer_params(m: nn.Module) -> int:
    return sum(x.weight.numel() for x in m.modules()
               if isinstance(x, WEIGHT_TYPES) and getattr(x, "weight", None) is not None)


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _stage_members(mod: nn.Module, name: str) -> list[str]:
    """The blocks a stage container holds, expanded through nested stages: a ModuleList,
    ModuleDict or Sequential whose members all share one non-layer class is a stage."""
    if not isinstance(mod, _CONTAINERS):
        return [name]
    kids = list(mod.named_children())
    if not kids:
        return []
    kinds = {type(c) for _, c in kids}
    stagey = all(isinstance(c, _CONTAINERS) for _, c in kids)
    if not stagey and (len(kinds) > 1 or isinstance(kids[0][1], WEIGHT_TYPES)):
        return [name] if isinstance(mod, nn.Sequential) else []
    return [n for c, child in kids for n in _stage_members(child, f"{name}.{c}")]


def find_stacks(root: nn.Module) -> list[tuple[str, list[str]]]:
    """[(container name, [block names])]: groups of same-class siblings that hold weight layers.

    Every parent's children are grouped by class; a group of two or more non-layer modules
    holding at least ``_MIN_SHARE`` of the model's layer weights is a candidate. Candidates are
    taken largest first without overlap, and inner candidates that together hold nearly all of
    an outer one's weights (blocks inside one or several stages) are taken instead of it.
    """
    total = max(_layer_params(root), 1)
    cands: list[tuple[str, list[str], int]] = []
    for pname, parent in root.named_modules():
        groups: dict[type, list[str]] = defaultdict(list)
        for cname, child in parent.named_children():
            if isinstance(child, (*WEIGHT_TYPES, nn.ModuleList, nn.ModuleDict)):
                continue  # layers and bare containers are not blocks; their members may be
            groups[type(child)].append(f"{pname}.{cname}" if pname else cname)
        # blocks pooled across the stages of a container (a ModuleDict or list of stages, each
        # a Sequential/ModuleList of same-class blocks, the stages of unequal length)
        pooled: dict[type, list[str]] = defaultdict(list)
        for cname, child in parent.named_children():
            if isinstance(child, _CONTAINERS):
                for n in _stage_members(child, f"{pname}.{cname}" if pname else cname):
                    pooled[type(root.get_submodule(n))].append(n)
        for cls, names in pooled.items():
            if not issubclass(cls, WEIGHT_TYPES) and names not in groups.values():
                groups[(cls, "pooled")] = names  # type: ignore[index]
        for names in groups.values():
            if len(names) < 2:
                continue
            size = sum(_layer_params(root.get_submodule(n)) for n in names)
            # a pair is a stack only when it is big (two blocks), not two small embedders
            need = _MIN_SHARE if len(names) >= 3 else _PAIR_SHARE
            if size < need * total:
                continue
            same = [i for i, c in enumerate(cands) if c[1] == names]
            if not same:
                cands.append((pname, names, size))
            elif len(pname) > len(cands[same[0]][0]):  # named by its nearest container
                cands[same[0]] = (pname, names, size)

    def inside(a: list[str], b: list[str]) -> bool:  # every block of a lies in a block of b
        return all(any(x.startswith(y + ".") for y in b) for x in a)

    def outermost(group: list[tuple[str, list[str], int]]) -> list[tuple[str, list[str], int]]:
        return [c for c in group if not any(d is not c and inside(c[1], d[1]) for d in group)]

    keep = []
    for c in cands:
        # stacks inside c's members that together hold nearly all of c (blocks inside stages,
        # one stage or several) are the blocks; c is only their container
        inner = outermost([d for d in cands if d is not c and inside(d[1], c[1])])
        if sum(d[2] for d in inner) >= _INNER_SHARE * c[2]:
            continue
        keep.append(c)
    keep.sort(key=lambda c: (-c[2], -len(c[1])))
    chosen: list[tuple[str, list[str], int]] = []
    def overlap(a: list[str], b: list[str]) -> bool:  # a module of a is, holds or sits in one of b
        return any(x == y or x.startswith(y + ".") or y.startswith(x + ".") for x in a for y in b)

    for c in keep:
        if any(overlap(c[1], d[1]) for d in chosen):
            continue
        chosen.append(c)
    return [(p, names) for p, names, _ in chosen]


def blocks_from_spec(root: nn.Module, selectors: list[str]) -> list[str]:
    """Block names from a ModelSpec: a container's children, an exact block, or a 're:' regex."""
    from compress.errors import UserError

    names = [n for n, _ in root.named_modules() if n]
    out: list[str] = []
    for sel in selectors:
        if sel.startswith("re:"):
            try:
                pat = re.compile(sel[3:])
            except re.error as exc:
                raise UserError(f"model.blocks: bad regex {sel!r}: {exc}") from None
            hit = [n for n in names if pat.fullmatch(n)]
        else:
            try:
                mod = root.get_submodule(sel)
            except AttributeError:
                raise UserError(f"model.blocks: {sel!r} is not a submodule of this model (see "
                                "`compress.inspect(module)` for the names)") from None
            kids = [f"{sel}.{c}" for c, _ in mod.named_children()]
            container = isinstance(mod, (nn.ModuleList, nn.Sequential))
            hit = kids if container else [sel]
        if not hit:
            raise UserError(f"model.blocks: {sel!r} matches no module of this model")
        out.extend(h for h in hit if h not in out)
    return out


# ------------------------------------------------------------------------------ roles


def _owner(name: str, blocks: list[str]) -> str | None:
    return next((b for b in blocks if name.startswith(b + ".")), None)


def _sources(tr: FlowTrace, prov: frozenset[int]) -> set[int]:
    """Producer nodes reached from ``prov`` through normalisations (q/k norms, pre-norms)."""
    seen, out, todo = set(), set(), list(prov)
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        if tr.nodes[i].kind == "norm":
            todo.extend(tr.nodes[i].producers)
        else:
            out.add(i)
    return out


def _layers(tr: FlowTrace, ids: set[int]) -> set[str]:
    return {tr.nodes[i].name for i in ids if tr.nodes[i].kind == "layer"}


def _descends_from_norm(tr: FlowTrace, prov: frozenset[int]) -> bool:
    return any(tr.nodes[i].kind == "norm" for i in prov)


def _other_stream(tr: FlowTrace, q_src: set[int], k_src: set[int]) -> bool:
    """Keys from another sequence: no key layer reads what a query layer reads."""
    ql = [tr.nodes[i] for i in q_src if tr.nodes[i].kind == "layer"]
    kl = [tr.nodes[i] for i in k_src if tr.nodes[i].kind == "layer"]
    if not ql or not kl:
        return False
    q_in = frozenset().union(*(n.producers for n in ql))
    return not any(n.producers & q_in or n.name in {m.name for m in ql} for n in kl)


def infer_roles(tr: FlowTrace, layer_names: list[str], blocks: list[str], batch: int | None,
                hint: Callable[[str], str | None]) -> tuple[dict[str, str], dict[str, str]]:
    """Role and reason per layer from a trace (``hint`` is the name-based fallback)."""
    calls: dict[str, list[int]] = defaultdict(list)
    for n in tr.nodes:
        if n.kind == "layer":
            calls[n.name].append(n.index)
    attn_role: dict[str, tuple[str, str]] = {}
    for node in tr.nodes:
        if node.kind != "attn":
            continue
        q, k, v = (node.inputs + [frozenset()] * 3)[:3]
        cross = node.info.get("q_len", -1) != node.info.get("k_len", -1) or \
            _other_stream(tr, _sources(tr, q), _sources(tr, k))
        what = "cross-attention (keys of another length)" if cross else "self-attention"
        for lname in _layers(tr, _sources(tr, q) | _sources(tr, k) | _sources(tr, v)):
            attn_role.setdefault(lname, ("cross_attn" if cross else "attn_qkv",
                                         f"feeds a softmax {what} as query/key/value"))
        for other in tr.nodes:
            if other.kind == "layer" and node.index in _sources(tr, other.producers):
                attn_role.setdefault(other.name, ("cross_attn" if cross else "attn_out",
                                                  f"takes the output of a softmax {what}"))
    per_sample = {n.name for n in tr.nodes
                  if n.kind == "layer" and batch is not None and n.info.get("rows", 0) <= batch}
    modulating: set[str] = set()
    for a, b in tr.mul_pairs:
        for x, y in ((a, b), (b, a)):
            if _descends_from_norm(tr, x):
                modulating |= _layers(tr, set(y)) & per_sample
    ff_role: dict[str, tuple[str, str]] = {}
    for node in tr.nodes:
        if node.kind != "layer" or node.name in per_sample:
            continue
        src = _sources(tr, node.producers)
        acts = [tr.nodes[i] for i in src if tr.nodes[i].kind == "act"]
        if not acts:
            continue
        ff_role.setdefault(node.name, ("ff_out", f"takes the output of {acts[0].name}"))
        feeders: set[str] = set()
        for a in acts:
            feeders |= _layers(tr, _sources(tr, a.producers))
        feeders |= _layers(tr, src)  # a gated partner (x * act(w x)) feeds the product directly
        for f in feeders - per_sample - {node.name}:
            leaf = node.name.rsplit(".", 1)[-1]
            if ff_role.get(f, ("",))[0] != "ff_in":  # a layer between two non-linearities
                ff_role[f] = ("ff_in", f"feeds {acts[0].name} into {leaf}")

    first_block = min((calls_i for b in blocks for n, c in calls.items()
                       if n.startswith(b + ".") for calls_i in c), default=None)
    last_block = max((calls_i for b in blocks for n, c in calls.items()
                      if n.startswith(b + ".") for calls_i in c), default=None)
    roles, reasons = {}, {}
    for name in layer_names:
        owner = _owner(name, blocks)
        role = reason = None
        if name not in calls:
            role = hint(name)
            reason = ("not called in the traced forward; " +
                      (f"name hint -> {role}" if role else "no role"))
        elif name in attn_role:
            role, reason = attn_role[name]
        elif name in per_sample and name in modulating:
            role, reason = "adaln", "one row per sample (conditioning), modulates a normalisation"
        elif owner is None and blocks:
            before = first_block is not None and calls[name][0] < first_block
            after = last_block is not None and calls[name][0] > last_block
            if before:
                role, reason = "embed", "outside the blocks, runs before them"
            elif after:
                role, reason = "proj_out", "outside the blocks, runs after them (the head)"
            else:
                role, reason = hint(name), "outside the blocks, between them"
        elif name in per_sample:
            role, reason = "embed", "one row per sample (conditioning), modulates nothing"
        elif name in ff_role:
            role, reason = ff_role[name]
        else:
            role = hint(name)
            reason = f"name hint -> {role}" if role else "no structural evidence, no name hint"
        roles[name] = role or "other"
        reasons[name] = reason
    return roles, reasons


def batch_of(args: tuple, kwargs: dict) -> int | None:
    """The sample count of a call: the leading size of its first tensor input of rank >= 2."""
    import torch

    def walk(o):
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, (list, tuple)):
            for x in o:
                yield from walk(x)
        elif isinstance(o, dict):
            for x in o.values():
                yield from walk(x)

    for t in walk((args, kwargs)):
        if t.ndim >= 2:
            return int(t.shape[0])
    return None


def analyse(root: nn.Module, call: Callable[[], Any] | None, batch: int | None,
            hint: Callable[[str], str | None], block_spec: list[str] | None = None,
            roles_spec: dict[str, str] | None = None) -> Structure:
    """Blocks and roles of ``root``; ``call()`` runs one forward (None: no trace, names only)."""
    from compress.targets import matches

    notes: list[str] = []
    if block_spec:
        blocks = blocks_from_spec(root, block_spec)
        stacks = sorted({b.rpartition(".")[0] for b in blocks})
        notes.append("blocks named by the model spec")
    else:
        found = find_stacks(root)
        stacks = [p for p, _ in found]
        blocks = [b for _, names in found for b in names]
    layer_names = [n for n, m in root.named_modules() if isinstance(m, WEIGHT_TYPES)]
    traced = False
    if call is not None:
        ids = {id(m.weight): n for n, m in root.named_modules()
               if isinstance(m, WEIGHT_TYPES) and getattr(m, "weight", None) is not None}
        order: dict[str, int] = {}
        hooks = []
        for b in blocks:
            mod = root.get_submodule(b)
            def seen(_m, _a, b=b) -> None:  # a pre-hook returning a value would replace args
                order.setdefault(b, len(order))

            hooks.append(mod.register_forward_pre_hook(seen))
        try:
            tr = trace_call(root, call, ids)
        finally:
            for h in hooks:
                h.remove()
        traced = True
        blocks = sorted(blocks, key=lambda b: order.get(b, len(order) + blocks.index(b)))
        idle = [b for b in blocks if b not in order]
        if idle:
            notes.append(f"{len(idle)} blocks did not run in the traced call: {idle[:3]}")
        roles, reasons = infer_roles(tr, layer_names, blocks, batch, hint)
    else:
        roles, reasons = {}, {}
        for n in layer_names:
            r = hint(n)
            roles[n] = r or "other"
            reasons[n] = (f"name hint -> {r}" if r else "no trace, no name hint")
        notes.append("no forward call to trace: roles from names only")
    # the spec wins; an exact name beats a regex whatever their order
    unknown = [s for s in (roles_spec or {}) if not s.startswith("re:") and s not in layer_names]
    if unknown:
        from compress.errors import UserError

        raise UserError(f"model.roles: {unknown[0]!r} is not a weight layer of this model (see "
                        "`compress.inspect(module)` for the names)")
    for sel, role in sorted((roles_spec or {}).items(), key=lambda kv: kv[0].startswith("re:")):
        for n in layer_names:
            if matches(sel, n, "") and not reasons[n].startswith("set by the model spec ("):
                roles[n], reasons[n] = role, f"set by the model spec ({sel})"
    return Structure(blocks, stacks, roles, reasons, traced, notes)
