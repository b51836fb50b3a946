"""A LoRA made for the original model, re-addressed to a compressed output's structure.

The output's manifest lists its passes with their meta. Depth pruning removes and renumbers
blocks (``transformer_blocks.5`` may now be ``transformer_blocks.3``): keys are renamed and
those of removed blocks dropped. Width pruning keeps some heads and channels of each unit: the
adapter's ``B`` keeps the rows of the kept outputs and its ``A`` the columns of the kept inputs.
``to_moe`` splits a feed-forward's first and last layers into a shared expert and routed experts
(hidden channels reordered): the first layer's adapter becomes one adapter per expert (``B``'s
rows of the expert's channels, ``A`` whole), the last layer's likewise (``A``'s columns of the
expert's channels, ``B`` whole), so each expert runs its part of the branch on its own tokens and
the pair with every expert chosen computes the original layer's branch exactly.
Keys whose layer has no side branch (a quantised convolution, a depthwise convolution whose
channels to_moe reordered) or whose shapes still do not match are dropped. Every dropped key is
named in the returned notes.
"""

from __future__ import annotations

import torch

# torch layers PEFT's own LoRA layers wrap (left as they are by the compression passes)
_PLAIN = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
# suffixes of one layer's adapter tensors, after the module path
_PARTS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "alpha")


def split_key(key: str) -> tuple[str, str] | None:
    """``blocks.0.attn.to_q.lora_A.weight`` -> (``blocks.0.attn.to_q``, ``lora_A.weight``)."""
    for part in _PARTS:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    return None


def _block_renames(meta: dict) -> tuple[dict[str, str], list[str]]:
    """Depth meta -> ({old block name: new block name}, [removed block names])."""
    renames, seen = {}, {}
    for old in meta.get("kept", []):
        parent, _, _ = str(old).rpartition(".")
        i = seen.get(parent, 0)
        seen[parent] = i + 1
        renames[str(old)] = f"{parent}.{i}" if parent else str(i)
    return renames, [str(n) for n in meta.get("removed", [])]


def _in_block(path: str, block: str) -> bool:
    return path == block or path.startswith(block + ".")


def _depth(layers: dict[str, dict], meta: dict, notes: list[str]) -> dict[str, dict]:
    renames, removed = _block_renames(meta)
    out = {}
    for path, t in layers.items():
        if any(_in_block(path, b) for b in removed):
            notes.append(f"{path}: its block was removed by depth pruning")
            continue
        new = path
        for old, now in renames.items():
            if _in_block(path, old):
                new = now + path[len(old):]
                break
        out[new] = t
    return out


def _indices(unit: dict, keep: list[int], stacked: int) -> tuple[list[int], list[int]]:
    """(kept, dropped) positions of a unit's rows or columns (``stacked`` copies for rows)."""
    g, n = int(unit["group"]), int(unit["count"])
    kept, dropped = [], []
    ks = {int(e) for e in keep}
    for p in range(stacked):
        for e in range(n):
            span = range(p * n * g + e * g, p * n * g + (e + 1) * g)
            (kept if e in ks else dropped).extend(span)
    return kept, dropped


def _width(layers: dict[str, dict], meta: dict) -> dict[str, dict]:
    keep, units = meta.get("keep", {}), meta.get("units", {})
    drop_rows: dict[str, set[int]] = {}
    drop_cols: dict[str, set[int]] = {}
    for name, unit in units.items():
        k = keep.get(name)
        if k is None:
            continue
        for layer in unit.get("outputs", []):
            _, dropped = _indices(unit, k, int(unit.get("parts", {}).get(layer, 1)))
            drop_rows.setdefault(layer, set()).update(dropped)
        for layer in unit.get("inputs", []):
            _, dropped = _indices(unit, k, 1)
            off = int(unit.get("offset", {}).get(layer, 0))
            drop_cols.setdefault(layer, set()).update(off + c for c in dropped)
    out = {}
    for path, t in layers.items():
        t = dict(t)
        if path in drop_rows:
            n = t["lora_B.weight"].shape[0]
            rows = torch.tensor([r for r in range(n) if r not in drop_rows[path]])
            t["lora_B.weight"] = t["lora_B.weight"][rows]
            if "lora_B.bias" in t:
                t["lora_B.bias"] = t["lora_B.bias"][rows]
        if path in drop_cols:
            n = t["lora_A.weight"].shape[1]
            cols = torch.tensor([c for c in range(n) if c not in drop_cols[path]])
            t["lora_A.weight"] = t["lora_A.weight"][:, cols]
        out[path] = t
    return out


def _spans(unit: dict) -> list[tuple[str, list[int]]]:
    """(child name, original hidden channels) of the shared expert and each routed expert."""
    order, shared = [int(i) for i in unit["order"]], int(unit["shared"])
    out = [("shared", order[:shared])] if shared else []
    a = shared
    for e, w in enumerate(unit["widths"]):
        out.append((f"experts.{e}", order[a:a + int(w)]))
        a += int(w)
    return out


def _moe(layers: dict[str, dict], meta: dict, notes: list[str]) -> dict[str, dict]:
    out = dict(layers)
    for unit in meta.get("units", []):
        spec = unit["spec"]
        ins = {(s["name"] + ".proj" if s.get("act") else s["name"]): s for s in spec["ins"]}
        o = spec["out"]
        for d in spec.get("depthwise", []):
            if out.pop(d["name"], None) is not None:
                notes.append(f"{d['name']}: a depthwise convolution whose channels to_moe "
                             "reordered; takes no LoRA side branch")
        touched = [p for p in (*ins, o["name"]) if p in out]
        if touched and "order" not in unit:
            for p in touched:
                out.pop(p)
                notes.append(f"{p}: split into experts by a to_moe run that did not record its "
                             "channel order (re-run to_moe to put a LoRA on its experts)")
            continue
        hidden = int(spec["hidden"])
        for path, s in ins.items():
            t = out.pop(path, None)
            if t is None:
                continue
            a = t["lora_A.weight"].flatten(1)
            b = t["lora_B.weight"].flatten(1)
            for child, idx in _spans(unit):
                rows = torch.tensor([p * hidden + i for p in range(int(s["parts"])) for i in idx],
                                    dtype=torch.long)
                piece = {"lora_A.weight": a, "lora_B.weight": b[rows]}
                if "lora_B.bias" in t:
                    piece["lora_B.bias"] = t["lora_B.bias"][rows]
                if "alpha" in t:
                    piece["alpha"] = t["alpha"]
                out[f"{s['name']}.{child}"] = piece
        t = out.pop(o["name"], None)
        if t is None:
            continue
        a, b = t["lora_A.weight"].flatten(1), t["lora_B.weight"].flatten(1)
        off = int(o.get("offset", 0))
        pieces = ([("rest", list(range(off)))] if off else []) + \
            [(c, [off + i for i in idx]) for c, idx in _spans(unit)]
        for j, (child, cols) in enumerate(pieces):
            piece = {"lora_A.weight": a[:, torch.tensor(cols, dtype=torch.long)],
                     "lora_B.weight": b}
            if "lora_B.bias" in t and j == 0:
                if child in ("rest", "shared"):  # run by every token: the bias added once
                    piece["lora_B.bias"] = t["lora_B.bias"]
                else:
                    notes.append(f"{o['name']}: its adapter's bias left out (no part of the "
                                 "layer runs on every token)")
            if "alpha" in t:
                piece["alpha"] = t["alpha"]
            out[f"{o['name']}.{child}"] = piece
    return out


def through_passes(layers: dict[str, dict], passes: list[dict]) -> tuple[dict[str, dict],
                                                                          list[str]]:
    """Follow ``layers`` ({module path: {part: tensor}}, original numbering) through the
    manifest's passes in order. Returns (the layers as the output names and shapes them, notes
    on what was dropped)."""
    notes: list[str] = []
    for p in passes:
        if p.get("name") == "prune_depth":
            layers = _depth(layers, p.get("meta", {}), notes)
        elif p.get("name") == "prune_width":
            layers = _width(layers, p.get("meta", {}))
        elif p.get("name") == "to_moe":
            layers = _moe(layers, p.get("meta", {}), notes)
    return layers, notes


def fit(layers: dict[str, dict], model: torch.nn.Module, hosts: tuple[type, ...],
        notes: list[str]) -> dict[str, dict]:
    """Keep the layers whose module exists, can host a side branch and matches in shape."""
    mods = dict(model.named_modules())
    out = {}
    for path, t in layers.items():
        m = mods.get(path)
        base = getattr(m, "base_layer", m)
        if m is None:
            owner = next((mods[a] for a in _ancestors(path) if a in mods), None)
            kind = type(owner).__name__ if owner is not None else ""
            notes.append(f"{path}: inside a {kind}, which takes no LoRA side branch"
                         if kind.startswith("MoE") else f"{path}: no such layer in this model")
            continue
        if not isinstance(base, (*_PLAIN, *hosts)):
            notes.append(f"{path}: a {type(base).__name__}, which takes no LoRA side branch")
            continue
        a, b = t.get("lora_A.weight"), t.get("lora_B.weight")
        if a is None or b is None:
            notes.append(f"{path}: lora_A or lora_B missing in the file")
            continue
        if not isinstance(base, (torch.nn.Linear, *hosts)):
            out[path] = t  # a float conv or embedding: PEFT's own layers check them
            continue
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            notes.append(f"{path}: adapter is {b.shape[0]}x{a.shape[1]}, the layer "
                         f"{base.out_features}x{base.in_features}")
            continue
        out[path] = t
    return out


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def structural(passes: list[dict]) -> bool:
    """Whether any pass changed names or shapes a LoRA for the original refers to."""
    return any(p.get("name") in ("prune_depth", "prune_width", "to_moe") for p in passes)
