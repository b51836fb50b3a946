"""Feeding calibration data through parts of the transformer, for passes that need inputs.

Layers are grouped into stages: the layers outside the blocks (embedders, final projection),
then one stage per block in execution order. A block stage replays the block's own inputs from
the CalibrationSet under the *current* transformer, so a pass that quantises stage by stage
calibrates each block on inputs that already carry the earlier blocks' quantisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from compress.quant.observers import patch_rows


def stages(handle, names: list[str]) -> list[tuple[str | None, list[str]]]:
    """[(block name or None for the rest, [layer names])] in execution order."""
    blocks = [b for b, _ in handle.adapter.blocks(handle.transformer)]
    per_block: dict[str, list[str]] = {b: [] for b in blocks}
    rest = []
    for n in names:
        owner = next((b for b in blocks if n.startswith(b + ".")), None)
        (per_block[owner] if owner else rest).append(n)
    out: list[tuple[str | None, list[str]]] = [(None, rest)] if rest else []
    out += [(b, per_block[b]) for b in blocks if per_block[b]]
    return out


def run_stage(
    handle, calib, stage: str | None, n_samples: int,
    on_sample: Callable[[float], None] | None = None,
) -> None:
    """Run ``n_samples`` calibration samples through a block (or the whole model for None).

    ``on_sample(timestep)`` is called before each sample (e.g. to set the timestep group).
    """
    sub = calib.subset(max_samples=n_samples)
    tr = handle.transformer
    with torch.no_grad():
        if stage is None:
            for i in range(len(sub)):
                s = sub.sample(i)
                if on_sample:
                    on_sample(s.timestep)
                handle.adapter.call(tr, s.args, s.kwargs)
            return
        block = tr.get_submodule(stage)
        for i, (args, kwargs) in enumerate(sub.block_inputs(tr, handle.adapter, stage)):
            if on_sample:
                on_sample(sub.sample(i).timestep)
            block(*args, **kwargs)


class RowSampler:
    """Keeps up to ``max_rows`` input rows per layer (evenly spaced, deterministic).

    A Conv2d's rows are its unfolded input patches (see ``observers.patch_rows``).
    """

    def __init__(self, modules: dict[str, nn.Module], max_rows: int = 256,
                 group_fn: Callable[[], int] | None = None) -> None:
        self.max_rows = max_rows
        self.group_fn = group_fn
        self.rows: dict[str, dict[int, list[torch.Tensor]]] = {n: {} for n in modules}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(mod, args):
            x = args[0].detach()
            x = patch_rows(mod, x) if isinstance(mod, nn.Conv2d) else x.reshape(-1, x.shape[-1])
            per_call = max(1, self.max_rows // 8)
            idx = torch.linspace(0, x.shape[0] - 1, min(per_call, x.shape[0])).long()
            g = self.group_fn() if self.group_fn else 0
            self.rows[name].setdefault(g, []).append(x[idx].float().cpu())
        return hook

    def get(self, name: str, group: int | None = None) -> torch.Tensor:
        groups = self.rows[name]
        parts = [t for g, ts in groups.items() if group is None or g == group for t in ts]
        x = torch.cat(parts)
        if x.shape[0] > self.max_rows:
            x = x[torch.linspace(0, x.shape[0] - 1, self.max_rows).long()]
        return x

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def iter_layers(tr: nn.Module, names: list[str]) -> Iterator[tuple[str, nn.Module]]:
    for n in names:
        yield n, tr.get_submodule(n)
