"""Adapter for Stable Diffusion 3 / 3.5 (SD3Transformer2DModel, joint MMDiT attention)."""

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
    # SD3.5's attn2 (dual_attention_layers) is a second self-attention over image tokens,
    # not cross-attention, so it must win over the shared attn2 -> cross_attn rule.
    (r"transformer_blocks\.\d+\.attn2\.(to_q|to_k|to_v)", "attn_qkv"),
    (r"transformer_blocks\.\d+\.attn2\.to_out\.0", "attn_out"),
    *ATTENTION_RULES,
    *EMBEDDER_RULES,  # time_text_embed: timestep and pooled-text embedders
    (r"pos_embed\.proj", "embed"),
    (r"context_embedder", "embed"),
    (r"transformer_blocks\.\d+\.(norm1|norm1_context)\.linear", "adaln"),
    (r"norm_out\.linear", "adaln"),
    (r"proj_out", "proj_out"),
)


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int | None,
    guidance: float | None,
    resolution: int | None,
) -> np.ndarray:
    """Images for ``prompts``, float32 (N, H, W, 3) in [0, 1]."""
    kw = optional_kwargs(steps, guidance)
    if resolution is not None:
        kw["height"] = kw["width"] = int(resolution)

    def call(ps: list[str], gens: list) -> Any:
        return pipe(prompt=ps, generator=gens, output_type="np", **kw)

    return run_per_prompt(call, prompts, seeds)


ADAPTER = FamilyAdapter(
    name="sd3",
    transformer_classes=("SD3Transformer2DModel",),
    block_lists=("transformer_blocks",),
    role_of=rules_role_of(RULES),
    # dual_attention_layers lists block indices too; depth pruning must renumber it.
    layer_config_keys={"transformer_blocks": "num_layers"},
    generate=generate,
)
