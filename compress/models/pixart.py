"""Adapter for PixArt-alpha / PixArt-Sigma (PixArtTransformer2DModel)."""

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

# T5 tokens kept per prompt. Padding is masked out in the transformer, so prompts shorter
# than this give the same images as the pipeline's 300 (Sigma) / 120 (alpha), only faster.
MAX_SEQUENCE_LENGTH = 64

RULES = (
    *ATTENTION_RULES,  # attn1 self-attention, attn2 cross-attention to the T5 tokens
    *EMBEDDER_RULES,  # adaln_single's timestep (and alpha's size/aspect) embedders
    (r"pos_embed\.proj", "embed"),
    (r"caption_projection\.linear_[12]", "embed"),
    # One shared adaLN-single projection; blocks only add a learned table to its output.
    (r"adaln_single\.linear", "adaln"),
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
        return pipe(
            prompt=ps,
            generator=gens,
            output_type="np",
            use_resolution_binning=False,
            clean_caption=False,  # needs bs4/ftfy and changes prompts behind the user's back
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            **kw,
        )

    return run_per_prompt(call, prompts, seeds)


ADAPTER = FamilyAdapter(
    name="pixart",
    transformer_classes=("PixArtTransformer2DModel",),
    block_lists=("transformer_blocks",),
    role_of=rules_role_of(RULES),
    layer_config_keys={"transformer_blocks": "num_layers"},
    generate=generate,
)
