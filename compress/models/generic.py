"""The fallback adapter for any nn.Module, and the naming rules and sampling helpers that the
family adapters share (diffusers names its attention and feed-forward layers the same way)."""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.models.base import FamilyAdapter

RoleRules = Sequence[tuple[str, str]]

# diffusers' Attention / FeedForward layout, shared by every family. Patterns are matched
# against the full qualified name, first match wins.
ATTENTION_RULES: RoleRules = (
    (r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)", "cross_attn"),
    # Joint (MMDiT) attention: the text stream's projections feed the same attention op as
    # the image stream, so they are self-attention roles, not cross-attention.
    (r".*\.(attn|attn1)\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)", "attn_qkv"),
    (r".*\.(attn|attn1)\.(to_out\.0|to_add_out)", "attn_out"),
    (r".*\.(ff|ff_context)\.net\.0\.proj", "ff_in"),
    (r".*\.(ff|ff_context)\.net\.2", "ff_out"),
)

# Embedders of timestep / guidance / pooled text found under any prefix.
EMBEDDER_RULES: RoleRules = (
    (
        (
            r"(.*\.)?(timestep_embedder|guidance_embedder|text_embedder|resolution_embedder"
            r"|aspect_ratio_embedder)\.linear_[12]"
        ),
        "embed",
    ),
)


def rules_role_of(rules: RoleRules) -> Callable[[str, nn.Module], str | None]:
    """A ``role_of`` function from ordered (regex, role) rules matched on the full name."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def role_of(name: str, module: nn.Module) -> str | None:
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            return None
        for pat, role in compiled:
            if pat.fullmatch(name):
                return role
        return None

    return role_of


# Cheap guesses for arbitrary modules: common names from DiT-like code bases (timm, diffusers).
_GENERIC_RULES: RoleRules = (
    *ATTENTION_RULES,
    *EMBEDDER_RULES,
    (r"(.*\.)?(cross_attn|attn2|xattn)\.[^.]*", "cross_attn"),
    (r"(.*\.)?(to_q|to_k|to_v|q_proj|k_proj|v_proj|qkv|to_qkv|in_proj)", "attn_qkv"),
    (r"(.*\.)?(attn|attention|self_attn)\.(proj|out_proj|o_proj|to_out|out)", "attn_out"),
    (r"(.*\.)?(fc1|w1|w3|up_proj|gate_proj|linear1|proj_in|fc_in)", "ff_in"),
    (r"(.*\.)?(fc2|w2|down_proj|linear2|fc_out)", "ff_out"),
    (r"(.*\.)?(adaLN_modulation\.\d+|adaln[^.]*|norm\d*\.linear|modulation[^.]*)", "adaln"),
    (r"(.*\.)?(x_embedder|t_embedder|y_embedder|pos_embed|patch_embed)(\..*)?", "embed"),
    (r"(final_layer\.linear|proj_out|out_proj)", "proj_out"),
)

_BLOCK_LIST_NAMES = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")
_HINTS = [(re.compile(p), r) for p, r in _GENERIC_RULES]

# Structure found per module instance (blocks, roles and why): filled by :func:`analyse_module`
# from one traced forward call; a module never analysed gets its stacks and name hints only.
_STRUCTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def name_hint(name: str) -> str | None:
    """The role a layer's name suggests (timm / diffusers / torch conventions), or None."""
    return next((r for pat, r in _HINTS if pat.fullmatch(name)), None)


def structure_of(module: nn.Module):
    """The module's :class:`~compress.models.structure.Structure` (found now if never analysed)."""
    from compress.models.structure import analyse

    s = _STRUCTURES.get(module)
    if s is None:
        s = analyse(module, None, None, name_hint)
        _STRUCTURES[module] = s
    return s


def analyse_module(module: nn.Module, args: tuple | None = None, kwargs: dict | None = None,
                   spec=None):
    """Find blocks and roles of ``module`` from one forward call on ``args``/``kwargs`` (or from
    its containers and names when no inputs are given), apply ``spec`` (a ModelSpec) on top,
    and remember the result for the generic adapter."""
    from compress.models.structure import analyse, batch_of

    call = None
    if args is not None or kwargs is not None:
        a, k = tuple(args or ()), dict(kwargs or {})
        call = lambda: module(*a, **k)
    s = analyse(module, call, batch_of(tuple(args or ()), dict(kwargs or {})), name_hint,
                block_spec=getattr(spec, "blocks", None), roles_spec=getattr(spec, "roles", None))
    _STRUCTURES[module] = s
    return s


def share_structure(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` (a deep copy of ``src``) the structure found on ``src``."""
    _STRUCTURES[dst] = structure_of(src)


class _GenericAdapter(FamilyAdapter):
    """Finds blocks and roles on the module at hand (structure and data flow, not names)."""

    def blocks(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(b, transformer.get_submodule(b)) for b in structure_of(transformer).blocks]

    def prepare(self, transformer: nn.Module) -> list[dict]:
        """Make every weight reachable by module swaps; call once before selecting layers.

        Replaces ``nn.MultiheadAttention`` (packed ``in_proj_weight``, ``out_proj`` read raw)
        and ``nn.TransformerEncoderLayer`` / ``DecoderLayer`` / ``Encoder`` (fused fast path)
        by numerically equivalent modules built from real ``nn.Linear`` children
        (``self_attn.q_proj`` ...), in place. Returns the records of what was replaced (with the
        parameter name mapping); :func:`restore_prepared` replays them on an empty skeleton.
        Idempotent: a second call finds nothing left to replace and returns ``[]``.
        """
        from compress.modules.mha import unfuse

        return plain_lists_to_modules(transformer) + unfuse(transformer)

    def weight_layers(self, transformer: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
        """As the base, but the projections of an unfused attention get attention roles
        whatever the attention module is called (``pool.out_proj`` is attn_out, not other),
        and the ``out_proj`` of a torch ``nn.MultiheadAttention`` left unprepared is not
        offered at all: torch reads its ``.weight`` raw, so swapping it would break the model."""
        from compress.modules.mha import UnfusedMultiheadAttention

        attn, raw = {}, set()
        for n, m in transformer.named_modules():
            if isinstance(m, UnfusedMultiheadAttention):
                attn[n] = m
            elif isinstance(m, nn.MultiheadAttention):
                raw.add(f"{n}.out_proj" if n else "out_proj")
        st = structure_of(transformer)
        for name, mod in transformer.named_modules():
            if not isinstance(mod, (nn.Linear, nn.Conv2d, nn.Conv1d)):
                continue
            role = st.roles.get(name) or name_hint(name) or "other"
            if name in raw:
                continue
            parent, _, leaf = name.rpartition(".")
            owner = attn.get(parent)
            if owner is not None and leaf in ("q_proj", "k_proj", "v_proj", "out_proj"):
                if owner.cross or role == "cross_attn":
                    role = "cross_attn"
                else:
                    role = "attn_out" if leaf == "out_proj" else "attn_qkv"
            yield name, mod, role


def restore_prepared(transformer: nn.Module, records: list[dict]) -> None:
    """Replay :meth:`_GenericAdapter.prepare` on a skeleton of the same model (e.g. on the meta
    device) before the quantised layers are rebuilt; fails if the skeleton does not match."""
    from compress.errors import UserError
    from compress.modules.mha import unfuse

    got = [(r["module"], r["was"], r["now"])
           for r in plain_lists_to_modules(transformer) + unfuse(transformer)]
    want = [(r["module"], r["was"], r["now"]) for r in records]
    if got != want:
        diff = sorted(set(want) ^ set(got))[:3]
        raise UserError(
            f"ptq: the model's attention/transformer layers do not match the manifest "
            f"(differs at {diff}); rebuild the same model class and config before loading"
        )


def plain_lists_to_modules(root: nn.Module) -> list[dict]:
    """Register blocks kept in a plain Python list or tuple attribute as an ``nn.ModuleList``.

    Such blocks are invisible to ``named_modules``, ``state_dict`` and ``.to()``: nothing could
    find, quantise or save them. A ModuleList iterates, indexes and slices like the list did.
    Returns one record per attribute converted (replayed by :func:`restore_prepared`).
    """
    records = []
    for mname, mod in list(root.named_modules()):
        for attr, val in list(vars(mod).items()):
            if attr.startswith("__") or not isinstance(val, (list, tuple)) or not val:
                continue
            if all(isinstance(x, nn.Module) for x in val):
                setattr(mod, attr, nn.ModuleList(val))
                full = f"{mname}.{attr}" if mname else attr
                records.append({"module": full, "was": type(val).__name__, "now": "ModuleList"})
    return records


ADAPTER = _GenericAdapter(
    name="generic",
    transformer_classes=(),
    block_lists=_BLOCK_LIST_NAMES,
    role_of=rules_role_of(_GENERIC_RULES),
)


# ----------------------------------------------------------------------------- sampling helpers


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, so an image depends only on its own seed."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def check_prompts_seeds(prompts: Sequence[str], seeds: Sequence[int]) -> None:
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; need one per prompt")


def optional_kwargs(steps: int | None, guidance: float | None) -> dict[str, Any]:
    """Pipeline kwargs for the values the caller set; None keeps the pipeline's default."""
    kw: dict[str, Any] = {}
    if steps is not None:
        kw["num_inference_steps"] = int(steps)
    if guidance is not None:
        kw["guidance_scale"] = float(guidance)
    return kw


def to_images(images: Any) -> np.ndarray:
    """Pipeline output (output_type="np") as float32 (N, H, W, 3) in [0, 1]."""
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[None]
    return np.clip(arr, 0.0, 1.0)


def run_per_prompt(
    call: Callable[[list[str], list[torch.Generator]], Any],
    prompts: Sequence[str],
    seeds: Sequence[int],
) -> np.ndarray:
    """Run ``call`` one prompt at a time and stack the images.

    One prompt per call keeps each image independent of what else is in the list (batched
    matmuls can differ in the last bits), so cached teacher images stay valid per prompt.
    """
    check_prompts_seeds(prompts, seeds)
    out = []
    with torch.no_grad():
        for p, s in zip(prompts, seeds):
            out.append(to_images(call([str(p)], generators([s])).images))
    if not out:
        return np.zeros((0, 0, 0, 3), dtype=np.float32)
    return np.concatenate(out, axis=0)
