"""A LoRA made for the original model, re-addressed to a compressed output's structure.

The output's manifest lists its passes with their meta. Depth pruning removes and renumbers
blocks (``transformer_blocks.5`` may now be ``transformer_blocks.3``): keys are renamed and
those of removed blocks dropped. Width pruning keeps some heads and channels of each unit: the
adapter's ``B`` keeps the rows of the kept outputs and its ``A`` the columns of the kept inputs.
Keys whose layer has no side branch (experts of a mixture, a quantised convolution) or whose
shapes still do not match are dropped. Every dropped key is named in the returned notes.
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
