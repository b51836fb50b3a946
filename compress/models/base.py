"""What every model-family adapter provides, and the handle that passes operate on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROLES = ("attn_qkv", "attn_out", "cross_attn", "ff_in", "ff_out", "adaln", "embed", "proj_out")


@dataclass(frozen=True)
class FamilyAdapter:
    """How one transformer family is laid out.

    name: short family name ("pixart", "sd3", ...).
    transformer_classes: diffusers class names this adapter handles.
    block_lists: attribute names of the ModuleLists holding the transformer blocks, in
        execution order (Flux: "transformer_blocks" then "single_transformer_blocks").
    role_of: maps a module's qualified name (relative to the transformer) and the module to one
        of ROLES, or None when the module carries no role (then it is "other").
    layer_config_keys: config keys that count blocks per block list (for depth pruning).
    generate: runs a pipeline of this family:
        generate(pipe, prompts, seeds, steps, guidance, resolution) -> float32 array (N, H, W, 3)
        in [0, 1], one image per prompt, prompt i seeded with torch.Generator().manual_seed(seeds[i]).
        ``resolution`` is the image side in pixels or None for the family's default.
        (DiT is class-conditional: prompts are mapped to class ids by the adapter.)
    """

    name: str
    transformer_classes: tuple[str, ...]
    block_lists: tuple[str, ...]
    role_of: Callable[[str, nn.Module], str | None]
    layer_config_keys: dict[str, str] = field(default_factory=dict)
    generate: Callable[..., Any] | None = None

    def blocks(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        """(qualified name, block) for every block, in execution order."""
        out = []
        for attr in self.block_lists:
            lst = getattr(transformer, attr, None)
            if lst is None:
                continue
            out.extend((f"{attr}.{i}", b) for i, b in enumerate(lst))
        return out

    def weight_layers(self, transformer: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
        """(name, module, role) for every Linear / Conv2d; role "other" when unknown. A layer a
        pass built (an MoE expert) carries its role in ``compress_role``."""
        for name, mod in transformer.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Conv1d)):
                yield name, mod, getattr(mod, "compress_role", None) or \
                    self.role_of(name, mod) or "other"

    def call(self, transformer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """Run the transformer on captured inputs and return its main output tensor."""
        kwargs = dict(kwargs)
        if _accepts(transformer, "return_dict"):
            kwargs["return_dict"] = False
        out = transformer(*args, **kwargs)
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out


def _accepts(module: nn.Module, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


@dataclass
class ModelHandle:
    """A loaded model: the pipeline (if any), its transformer and its family adapter.

    For a plain ``nn.Module`` from Python, ``pipeline`` is None and ``calibrate_fn`` is the
    user's callable that runs the module on representative inputs (ModelOpt's forward_loop) and
    ``sample_fn`` the user's sampler (module and seeds in, images or latents out), if given.
    """

    transformer: nn.Module
    adapter: FamilyAdapter
    pipeline: Any = None
    source: Path | None = None
    source_hash: str | None = None
    calibrate_fn: Callable[[nn.Module], None] | None = None
    sample_fn: Callable[[nn.Module, list[int]], Any] | None = None
    # for training passes: the original transformer (frozen), set by the runner when a pass
    # needs it; which original block each current block came from (structural passes keep it)
    teacher: nn.Module | None = None
    origin: dict[str, str] | None = None
    # run options the passes may read: device, cache root, resume, checkpoint folder
    run: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.adapter.name

    def block_origin(self) -> dict[str, str]:
        """Current block name -> the original block it came from (identity when unpruned)."""
        if self.origin is not None:
            return dict(self.origin)
        return {n: n for n, _ in self.adapter.blocks(self.transformer)}

    def params(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())
