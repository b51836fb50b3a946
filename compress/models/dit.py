"""Adapter for DiT (DiTTransformer2DModel / DiTPipeline): class-conditional, prompts become
class ids."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from compress.errors import UserError
from compress.models.base import FamilyAdapter
from compress.models.generic import (
    ATTENTION_RULES,
    EMBEDDER_RULES,
    optional_kwargs,
    rules_role_of,
    run_per_prompt,
)

RULES = (
    *ATTENTION_RULES,
    *EMBEDDER_RULES,  # each block carries its own timestep embedder under norm1.emb
    (r"pos_embed\.proj", "embed"),
    (r"transformer_blocks\.\d+\.norm1\.linear", "adaln"),
    # The final layer splits into a conditioning projection (shift/scale) and the output one.
    (r"proj_out_1", "adaln"),
    (r"proj_out_2", "proj_out"),
)


def class_id(pipe: Any, prompt: str) -> int:
    """The class a prompt asks for.

    A prompt equal to a label of ``pipe.id2label`` (case-insensitive) maps to it; else the
    longest label the prompt contains as whole words; else a stable hash of the prompt
    modulo the number of classes.
    """
    labels = {k.lower(): int(v) for k, v in (getattr(pipe, "labels", None) or {}).items()}
    text = " ".join(prompt.lower().split())
    if text in labels:
        return labels[text]
    best: tuple[int, str] | None = None
    for label in sorted(labels):
        named = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text)
        if named and (best is None or len(label) > best[0]):
            best = (len(label), label)
    if best is not None:
        return labels[best[1]]
    num_classes = int(pipe.transformer.config.num_embeds_ada_norm)
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_classes


def native_resolution(pipe: Any) -> int:
    """DiTPipeline samples at the transformer's sample_size; the VAE scales it up."""
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(pipe.transformer.config.sample_size) * scale


def generate(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int | None,
    guidance: float | None,
    resolution: int | None,
) -> np.ndarray:
    """Images for ``prompts`` (mapped to class ids), float32 (N, H, W, 3) in [0, 1]."""
    native = native_resolution(pipe)
    if resolution is not None and int(resolution) != native:
        raise UserError(
            f"DiT samples only at its native {native}px (transformer sample_size); "
            f"got resolution {resolution}: leave the resolution unset"
        )
    kw = optional_kwargs(steps, guidance)

    def call(ps: list[str], gens: list) -> Any:
        ids = [class_id(pipe, p) for p in ps]
        return pipe(class_labels=ids, generator=gens, output_type="np", **kw)

    return run_per_prompt(call, prompts, seeds)


ADAPTER = FamilyAdapter(
    name="dit",
    transformer_classes=("DiTTransformer2DModel",),
    block_lists=("transformer_blocks",),
    role_of=rules_role_of(RULES),
    layer_config_keys={"transformer_blocks": "num_layers"},
    generate=generate,
)
