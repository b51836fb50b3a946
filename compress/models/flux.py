"""Adapter for FLUX.1 (FluxTransformer2DModel): double-stream blocks, then single-stream ones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from compress.models.base import FamilyAdapter
from compress.models.generic import (
    ATTENTION_RULES,
    EMBEDDER_RULES,
    optional_kwargs,
    rules_role_of,
    run_per_prompt,
)

RULES = (
    # Single-stream blocks: one fused input (q, k, v and the MLP's up-projection side by side)
    # and one fused output over [attention, MLP]; its input is mostly MLP, hence ff_out.
    (r"single_transformer_blocks\.\d+\.proj_mlp", "ff_in"),
    (r"single_transformer_blocks\.\d+\.proj_out", "ff_out"),
    (r"single_transformer_blocks\.\d+\.norm\.linear", "adaln"),
    *ATTENTION_RULES,
    *EMBEDDER_RULES,  # time_text_embed: timestep, guidance (dev) and pooled CLIP embedders
    (r"x_embedder", "embed"),
    (r"context_embedder", "embed"),
    (r"transformer_blocks\.\d+\.(norm1|norm1_context)\.linear", "adaln"),
    (r"norm_out\.linear", "adaln"),
    (r"proj_out", "proj_out"),
)


def default_resolution(pipe: Any) -> int | None:
    """FluxPipeline's own default is a fixed 1024px; the VAE's sample_size says the same for
    real checkpoints and stays right for smaller ones."""
    size = getattr(getattr(pipe, "vae", None), "config", {}).get("sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else None


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int | None,
    guidance: float | None,
    resolution: int | None,
) -> np.ndarray:
    """Images for ``prompts``, float32 (N, H, W, 3) in [0, 1]. ``guidance`` is Flux's embedded
    (distilled) guidance, not classifier-free guidance."""
    kw = optional_kwargs(steps, guidance)
    side = int(resolution) if resolution is not None else default_resolution(pipe)
    if side is not None:
        kw["height"] = kw["width"] = side

    def call(ps: list[str], gens: list) -> Any:
        return pipe(prompt=ps, generator=gens, output_type="np", **kw)

    return run_per_prompt(call, prompts, seeds)


ADAPTER = FamilyAdapter(
    name="flux",
    transformer_classes=("FluxTransformer2DModel",),
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    role_of=rules_role_of(RULES),
    layer_config_keys={
        "transformer_blocks": "num_layers",
        "single_transformer_blocks": "num_single_layers",
    },
    generate=generate,
)
