"""Adapter for Sana (SanaTransformer2DModel): linear attention and a conv GLU feed-forward."""

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
    # GLUMBConv: 1x1 expand to 2x hidden, 3x3 depthwise over those hidden channels, GLU, 1x1
    # project back. The depthwise conv lives on the hidden side, so it goes with ff_in.
    (r"transformer_blocks\.\d+\.ff\.(conv_inverted|conv_depth)", "ff_in"),
    (r"transformer_blocks\.\d+\.ff\.conv_point", "ff_out"),
    *ATTENTION_RULES,  # attn1 linear self-attention, attn2 cross-attention to Gemma tokens
    *EMBEDDER_RULES,  # time_embed's timestep (and Sprint's guidance) embedders
    (r"patch_embed\.proj", "embed"),
    (r"caption_projection\.linear_[12]", "embed"),
    (r"time_embed\.linear", "adaln"),  # shared adaLN-single projection
    (r"proj_out", "proj_out"),
)


def default_resolution(pipe: Any) -> int:
    """The transformer's native size (SanaPipeline's own default is a fixed 1024px)."""
    return int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)


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
    side = int(resolution) if resolution is not None else default_resolution(pipe)
    kw["height"] = kw["width"] = side

    def call(ps: list[str], gens: list) -> Any:
        return pipe(prompt=ps, generator=gens, output_type="np", use_resolution_binning=False, **kw)

    return run_per_prompt(call, prompts, seeds)


ADAPTER = FamilyAdapter(
    name="sana",
    transformer_classes=("SanaTransformer2DModel",),
    block_lists=("transformer_blocks",),
    role_of=rules_role_of(RULES),
    layer_config_keys={"transformer_blocks": "num_layers"},
    generate=generate,
)
