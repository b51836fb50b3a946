"""The original checkpoints' key layout for GGUF files (what ComfyUI-GGUF and stable-diffusion.cpp
read, and what diffusers' ``from_single_file`` converts back to its own).

diffusers renamed and split the reference implementations' tensors: SD3's ``joint_blocks.{i}``
became ``transformer_blocks.{i}``, each block's fused ``attn.qkv`` became ``to_q``/``to_k``/
``to_v`` (three row blocks of one matrix), and the final (and the last block's context) adaLN
projection lists its scale before its shift where the original lists shift first. Going back is
the same moves reversed: rename, stack the row blocks, swap the halves. GGUF's quantised rows are
independent (blocks of 32 along the input), so stacking and swapping rows move the stored blocks
unchanged; row blocks stacked into one tensor must share a type, so where the run gave them
different bits the stack takes the most precise one and the others are re-quantised to it.

Families: SD3 (``SD3Transformer2DModel``) and FLUX (``FluxTransformer2DModel``: double blocks'
``img_attn.qkv``/``txt_attn.qkv``, single blocks' ``linear1`` = [q | k | v | mlp] and
``linear2``). diffusers' FLUX converter assumes FLUX.1's width, so other widths get the
original layout only when asked for. The rest keep diffusers' own layout, which diffusers loads
unconverted (see :mod:`compress.io.gguf_export`).
"""

from __future__ import annotations

import re

import numpy as np

# (diffusers name pattern, original name, row-block position in a stack or None, halves swapped)
_SD3 = [
    (r"pos_embed\.pos_embed", "pos_embed", None, False),
    (r"pos_embed\.proj\.(\w+)", r"x_embedder.proj.\1", None, False),
    (r"time_text_embed\.timestep_embedder\.linear_([12])\.(\w+)", "t_embedder.mlp.{lin}.\\2",
     None, False),
    (r"time_text_embed\.text_embedder\.linear_([12])\.(\w+)", "y_embedder.mlp.{lin}.\\2", None,
     False),
    (r"context_embedder\.(\w+)", r"context_embedder.\1", None, False),
    (r"proj_out\.(\w+)", r"final_layer.linear.\1", None, False),
    (r"norm_out\.linear\.(\w+)", r"final_layer.adaLN_modulation.1.\1", None, True),
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])\.(\w+)", r"joint_blocks.\1.x_block.attn.qkv.\3",
     "qkv", False),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj\.(\w+)",
     r"joint_blocks.\1.context_block.attn.qkv.\3", "qkv", False),
    (r"transformer_blocks\.(\d+)\.attn2\.to_([qkv])\.(\w+)",
     r"joint_blocks.\1.x_block.attn2.qkv.\3", "qkv", False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_([qk])\.weight", r"joint_blocks.\1.x_block.attn.ln_\2.weight",
     None, False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_([qk])\.weight",
     r"joint_blocks.\1.context_block.attn.ln_\2.weight", None, False),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_([qk])\.weight",
     r"joint_blocks.\1.x_block.attn2.ln_\2.weight", None, False),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(\w+)", r"joint_blocks.\1.x_block.attn.proj.\2",
     None, False),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(\w+)",
     r"joint_blocks.\1.context_block.attn.proj.\2", None, False),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.(\w+)", r"joint_blocks.\1.x_block.attn2.proj.\2",
     None, False),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(\w+)",
     r"joint_blocks.\1.x_block.adaLN_modulation.1.\2", None, False),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(\w+)",
     r"joint_blocks.\1.context_block.adaLN_modulation.1.\2", None, "last"),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(\w+)", r"joint_blocks.\1.x_block.mlp.fc1.\2",
     None, False),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(\w+)", r"joint_blocks.\1.x_block.mlp.fc2.\2", None,
     False),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(\w+)",
     r"joint_blocks.\1.context_block.mlp.fc1.\2", None, False),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(\w+)",
     r"joint_blocks.\1.context_block.mlp.fc2.\2", None, False),
]

_FLUX = [
    (r"time_text_embed\.timestep_embedder\.linear_1\.(\w+)", r"time_in.in_layer.\1", None, False),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(\w+)", r"time_in.out_layer.\1", None, False),
    (r"time_text_embed\.text_embedder\.linear_1\.(\w+)", r"vector_in.in_layer.\1", None, False),
    (r"time_text_embed\.text_embedder\.linear_2\.(\w+)", r"vector_in.out_layer.\1", None, False),
    (r"time_text_embed\.guidance_embedder\.linear_1\.(\w+)", r"guidance_in.in_layer.\1", None,
     False),
    (r"time_text_embed\.guidance_embedder\.linear_2\.(\w+)", r"guidance_in.out_layer.\1", None,
     False),
    (r"context_embedder\.(\w+)", r"txt_in.\1", None, False),
    (r"x_embedder\.(\w+)", r"img_in.\1", None, False),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(\w+)", r"double_blocks.\1.img_mod.lin.\2",
     None, False),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(\w+)", r"double_blocks.\1.txt_mod.lin.\2",
     None, False),
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])\.(\w+)", r"double_blocks.\1.img_attn.qkv.\3",
     "qkv", False),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj\.(\w+)",
     r"double_blocks.\1.txt_attn.qkv.\3", "qkv", False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight",
     r"double_blocks.\1.img_attn.norm.query_norm.scale", None, False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight",
     r"double_blocks.\1.img_attn.norm.key_norm.scale", None, False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight",
     r"double_blocks.\1.txt_attn.norm.query_norm.scale", None, False),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight",
     r"double_blocks.\1.txt_attn.norm.key_norm.scale", None, False),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(\w+)", r"double_blocks.\1.img_mlp.0.\2",
     None, False),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(\w+)", r"double_blocks.\1.img_mlp.2.\2", None,
     False),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(\w+)",
     r"double_blocks.\1.txt_mlp.0.\2", None, False),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(\w+)", r"double_blocks.\1.txt_mlp.2.\2",
     None, False),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(\w+)", r"double_blocks.\1.img_attn.proj.\2",
     None, False),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(\w+)", r"double_blocks.\1.txt_attn.proj.\2",
     None, False),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear\.(\w+)",
     r"single_blocks.\1.modulation.lin.\2", None, False),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])\.(\w+)",
     r"single_blocks.\1.linear1.\3", "qkv", False),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp\.(\w+)", r"single_blocks.\1.linear1.\2", 3,
     False),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight",
     r"single_blocks.\1.norm.query_norm.scale", None, False),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight",
     r"single_blocks.\1.norm.key_norm.scale", None, False),
    (r"single_transformer_blocks\.(\d+)\.proj_out\.(\w+)", r"single_blocks.\1.linear2.\2", None,
     False),
    (r"proj_out\.(\w+)", r"final_layer.linear.\1", None, False),
    (r"norm_out\.linear\.(\w+)", r"final_layer.adaLN_modulation.1.\1", None, True),
]

LAYOUTS = {"SD3Transformer2DModel": ("sd3", _SD3), "FluxTransformer2DModel": ("flux", _FLUX)}
# FLUX: diffusers' converter assumes FLUX.1's width (3072, MLP ratio 4); "auto" writes the
# original layout only for models it can convert back
_FLUX_WIDTH = 3072
# most precise first: a stack of row blocks of different types takes the first of its types here
_PRECISION = ("F32", "F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def architecture(cls: str) -> str | None:
    """GGUF ``general.architecture`` of the original layout of ``cls``, None if not known."""
    return LAYOUTS[cls][0] if cls in LAYOUTS else None


def converts_back(cls: str, config: dict) -> bool:
    """Whether diffusers' ``from_single_file`` can turn this model's original layout back into
    its own (FLUX: only at FLUX.1's width, which its converter assumes)."""
    if cls == "FluxTransformer2DModel":
        width = int(config.get("num_attention_heads", 0)) * int(config.get("attention_head_dim", 0))
        return width == _FLUX_WIDTH
    return cls in LAYOUTS


def _last_block(names: list[str]) -> int:
    idx = [int(m.group(1)) for n in names if (m := re.match(r"transformer_blocks\.(\d+)\.", n))]
    return max(idx) if idx else -1


def _rename(name: str, rules, last: int) -> tuple[str, int, bool]:
    """(original name, row-block position, swap halves) of diffusers tensor ``name``."""
    for pat, repl, stack, swap in rules:
        m = re.fullmatch(pat, name)
        if m is None:
            continue
        out = m.expand(repl.replace("{lin}", str(2 * int(m.group(1)) - 2)) if "{lin}" in repl
                       else repl)
        pos = "qkv".index(m.group(2)) if stack == "qkv" else (stack or 0)
        if swap == "last":
            swap = int(m.group(1)) == last
        return out, pos, bool(swap)
    raise KeyError(name)


def _swap(a: np.ndarray) -> np.ndarray:
    half = a.shape[0] // 2
    return np.concatenate([a[half:], a[:half]], axis=0)


def to_original(cls: str, tensors: list[tuple[str, np.ndarray, str]], gguf
                ) -> tuple[list[tuple[str, np.ndarray, str]], list[str]]:
    """``tensors`` ((diffusers name, GGUF array, type)) in the original layout of ``cls``.
    Returns (the tensors renamed, stacked and swapped; the names re-quantised to stack them).
    KeyError names a tensor the layout has no place for."""
    rules = LAYOUTS[cls][1]
    last = _last_block([n for n, _, _ in tensors])
    groups: dict[str, list[tuple[int, bool, np.ndarray, str, str]]] = {}
    order: list[str] = []
    for name, arr, qtype in tensors:
        orig, pos, swap = _rename(name, rules, last)
        if orig not in groups:
            order.append(orig)
        groups.setdefault(orig, []).append((pos, swap, arr, qtype, name))
    out, requantised = [], []
    for orig in order:
        parts = sorted(groups[orig], key=lambda p: p[0])
        types = {p[3] for p in parts}
        qtype = min(types, key=_PRECISION.index)
        arrays = []
        for _pos, swap, arr, t, name in parts:
            if t != qtype:
                arr = _convert(gguf, arr, t, qtype)
                requantised.append(name)
            arrays.append(_swap(arr) if swap else arr)
        out.append((orig, arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0),
                    qtype))
    return out, requantised


def _convert(gguf, arr: np.ndarray, src: str, dst: str) -> np.ndarray:
    """A tensor of GGUF type ``src`` as type ``dst`` (through float32)."""
    if src in ("F32", "F16"):
        w = arr.astype(np.float32)
    else:
        w = gguf.quants.dequantize(arr, getattr(gguf.GGMLQuantizationType, src))
    if dst == "F32":
        return w.astype(np.float32)
    if dst == "F16":
        return w.astype(np.float16)
    return gguf.quants.quantize(w.astype(np.float32), getattr(gguf.GGMLQuantizationType, dst))
