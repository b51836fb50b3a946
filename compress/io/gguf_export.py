"""GGUF export: a ptq output (or a plain model at one type) as one .gguf file that diffusers'
``from_single_file`` loads with ``GGUFQuantizationConfig``.

Layout: for SD3 and FLUX the original checkpoint's tensor names and shapes (``joint_blocks.{i}``,
``double_blocks.{i}``, fused ``qkv``; what ComfyUI-GGUF and stable-diffusion.cpp read, and what
``from_single_file`` converts; :mod:`compress.io.gguf_layout`; FLUX only at FLUX.1's width
unless asked for); for the other classes diffusers can load from a single
file (FLUX, Sana and others; not PixArt or DiT) diffusers' own names and shapes, which
``from_single_file`` takes as they are (it converts a checkpoint only when its keys differ from
the model's). ``layout="diffusers"`` writes diffusers' layout for those too.

Types per layer, from the run's own bits: 8-bit layers -> Q8_0, 4-bit -> Q4_0 (symmetric) or
Q4_1 (asymmetric), fewer bits (VQ, int2/int3) -> Q4_0, 5/6-bit -> Q5_0 / Q5_1; the rest F32 (or
F16 with ``--float f16``). Codes carry over unchanged where our grid is GGUF's (symmetric, one
scale per row or per group of a multiple of 32 inputs, fp16 scales: ``QLinear``/``Int4Linear``
round to nearest or GPTQ); elsewhere (W8A8 with smoothing, fp8, VQ, low rank, other groups) the
layer's effective weight is re-quantised per block of 32 by the gguf package, and the file says
which layers in its metadata (``dit_compress.requantised``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress.errors import UserError
from compress.io import gguf_layout

BLOCK = 32
PLAIN_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "F16")
# stored bits a weight of each block type (codes, fp16 scale and, for _1 types, fp16 minimum)
TYPE_BITS = {"Q8_0": 8.5, "Q5_1": 6.0, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_0": 4.5}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("export-gguf needs the gguf package: pip install 'gguf>=0.19,<0.20'") \
            from None
    return gguf


def single_file_classes() -> list[str]:
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    return sorted(SINGLE_FILE_LOADABLE_CLASSES)


def _bits_of(m: nn.Module) -> tuple[int, bool]:
    """(bits, symmetric) a quantised layer stands for."""
    name = type(m).__name__
    if name == "W8A8Linear" or name.startswith("FP8"):
        return 8, True
    if name == "Int4Linear":
        return 4, bool(m.symmetric)
    bits = getattr(m, "bits", None) or getattr(m, "w_bits", None)
    if bits is None and hasattr(m, "bits_per_weight"):
        bits = math.ceil(float(m.bits_per_weight))
    return int(bits or 8), bool(getattr(m, "symmetric", True))


def gguf_type(bits: int, symmetric: bool) -> str:
    if bits >= 8:
        return "Q8_0"
    if bits >= 6:
        return "Q5_1"
    if bits == 5:
        return "Q5_0" if symmetric else "Q5_1"
    if bits == 4:
        return "Q4_0" if symmetric else "Q4_1"
    return "Q4_0"


def _per_column(m: nn.Module, w: torch.Tensor, asymmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The layer's fp16 scale (and zero point) per input column when its groups fit GGUF's
    blocks of 32, else None."""
    scale, zero = getattr(m, "scale", None), getattr(m, "zero", None)
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float16 or \
            scale.dim() != 2 or (zero is not None) != asymmetric or \
            type(m).__name__ not in ("QLinear", "Int4Linear"):
        return None
    in_f = w.shape[1]
    g = scale.shape[1]
    gs = -(-in_f // g)
    if in_f % BLOCK or gs % BLOCK and g > 1:
        return None
    d = scale.float().repeat_interleave(gs, dim=1)[:, :in_f]
    z = zero.float().repeat_interleave(gs, dim=1)[:, :in_f] if asymmetric else None
    return d, z


def _nibbles(u: np.ndarray) -> np.ndarray:
    """[..., 32] codes < 16 -> GGUF's 16 bytes: low nibbles the first 16, high the last 16."""
    return (u[..., :16] & 0x0F) | (u[..., 16:] << 4)


def _carried_q4_1(m: nn.Module, w: torch.Tensor) -> np.ndarray | None:
    """Q4_1 blocks (d, m, 4-bit codes: w = d q + m) with the asymmetric 4-bit layer's codes
    and fp16 scales; GGUF's minimum m = -zero x scale is rounded to fp16, the only change."""
    grid = _per_column(m, w, asymmetric=True)
    if grid is None:
        return None
    d, z = grid
    q = torch.round(w / d + z)
    if not torch.equal((q - z) * d, w) or q.min() < 0 or q.max() > 15:
        return None
    out_f, nb = w.shape[0], w.shape[1] // BLOCK
    dblk = d[:, ::BLOCK].half().contiguous().numpy()
    mblk = (-(z * d))[:, ::BLOCK].half().contiguous().numpy()
    head = np.concatenate([dblk.view(np.uint8).reshape(out_f, nb, 2),
                           mblk.view(np.uint8).reshape(out_f, nb, 2)], axis=2)
    body = _nibbles(q.to(torch.uint8).numpy().reshape(out_f, nb, BLOCK))
    return np.concatenate([head, body], axis=2).reshape(out_f, -1)


def _carried(m: nn.Module, w: torch.Tensor, qtype: str) -> np.ndarray | None:
    """Q8_0 / Q5_0 / Q4_0 / Q4_1 blocks holding the layer's codes and fp16 scales, or None when its
    grid is not GGUF's (groups not a multiple of 32, scales not fp16, ...)."""
    if qtype == "Q4_1":
        return _carried_q4_1(m, w)
    half = {"Q8_0": 128, "Q5_0": 16, "Q4_0": 8}.get(qtype)  # codes in [-half, half - 1]
    grid = _per_column(m, w, asymmetric=False) if half is not None else None
    if grid is None:
        return None
    d, _ = grid
    q = torch.round(w / d)
    if not torch.equal(q * d, w) or q.max() > half - 1 or q.min() < -half:
        return None
    out_f, nb = w.shape[0], w.shape[1] // BLOCK
    head = d[:, ::BLOCK].half().contiguous().numpy().view(np.uint8).reshape(out_f, nb, 2)
    qi = q.to(torch.int16).numpy().reshape(out_f, nb, BLOCK)
    if qtype == "Q8_0":
        body = qi.astype(np.int8).view(np.uint8)
    elif qtype == "Q4_0":
        body = _nibbles((qi + 8).astype(np.uint8))
    else:  # Q5_0: d, then the 32 fifth bits as one little-endian uint32, then the low nibbles
        u = (qi + 16).astype(np.uint32)
        high = (((u >> 4) & 1) << np.arange(BLOCK, dtype=np.uint32)).sum(axis=2, dtype=np.uint32)
        body = np.concatenate([high.astype("<u4").view(np.uint8).reshape(out_f, nb, 4),
                               _nibbles((u & 0x0F).astype(np.uint8))], axis=2)
    return np.concatenate([head, body], axis=2).reshape(out_f, -1)


def _quantised(gguf, w: torch.Tensor, qtype: str) -> np.ndarray:
    t = getattr(gguf.GGMLQuantizationType, qtype)
    return gguf.quants.quantize(w.float().numpy().astype(np.float32), t)


def _float(t: torch.Tensor, floats: str) -> tuple[np.ndarray, str]:
    a = t.detach().float().cpu().numpy()
    if floats == "f16" and a.ndim > 1:
        return a.astype(np.float16), "F16"
    return a.astype(np.float32), "F32"


def quantised_modules(tr: nn.Module) -> list[tuple[str, nn.Module]]:
    """Our quantised layers (they give their effective weight), outermost only, by name."""
    out: list[tuple[str, nn.Module]] = []
    for n, m in tr.named_modules():
        if type(m).__module__.startswith("compress.modules.") and \
                callable(getattr(m, "dequantized_weight", None)) and \
                not any(n.startswith(p + ".") for p, _ in out):
            out.append((n, m))
    return out


def _layer_tensors(gguf, tr: nn.Module, plain: str | None, floats: str, report: dict):
    """(name, array, gguf type name) for every state-dict tensor the stock class expects."""
    qmods = dict(quantised_modules(tr)) if plain is None else {}
    done: set[str] = set()
    for name, m in qmods.items():
        w = m.dequantized_weight(torch.float32).detach().cpu()
        bits, sym = _bits_of(m)
        qtype = gguf_type(bits, sym)
        if w.dim() != 2 or w.shape[1] % BLOCK:  # convs and ragged rows stay floats
            arr, qtype = _float(w, floats)
            report["float_layers"].append(name)
        else:
            arr = _carried(m, w, qtype)
            if arr is None:
                arr = _quantised(gguf, w, qtype)
                report["requantised"].append(name)
            else:
                report["carried"].append(name)
        yield f"{name}.weight", arr, qtype
        done.add(f"{name}.weight")
        b = getattr(m, "bias", None)
        if isinstance(b, torch.Tensor):
            yield f"{name}.bias", *_float(b, "f32")
            done.add(f"{name}.bias")
    quantise = plain_quantised(tr) if plain is not None and plain != "F16" else set()
    for key, t in tr.state_dict().items():
        if key in done or any(key.startswith(q + ".") for q in qmods):
            continue
        if key in quantise:
            report["requantised"].append(key.rpartition(".")[0])
            yield key, _quantised(gguf, t.detach().cpu(), plain), plain
        else:
            yield key, *_float(t, "f16" if plain == "F16" else floats)


def plain_quantised(tr: nn.Module) -> set[str]:
    """State-dict keys ``--type`` quantises in a plain model: the weights of the blocks' Linears
    whose input width is a multiple of 32 (every other tensor stays float)."""
    from compress.models import adapter_for

    ad = adapter_for(tr, allow_generic=True)
    blocks = [n for n, _ in ad.blocks(tr)]
    return {f"{n}.weight" for n, mod in tr.named_modules()
            if isinstance(mod, nn.Linear) and any(n.startswith(b + ".") for b in blocks)
            and mod.in_features % BLOCK == 0}


def plain_file_bytes(tr: nn.Module, qtype: str) -> float:
    """Tensor bytes of ``tr`` written by ``export-gguf --type qtype`` (other tensors F32)."""
    quantise = plain_quantised(tr)
    return sum(t.numel() * (TYPE_BITS[qtype] / 8 if k in quantise else 4)
               for k, t in tr.state_dict().items())


def _check_dest(dest: Path, force: bool) -> None:
    if dest.suffix != ".gguf":
        raise UserError(f"{dest}: give a file name ending in .gguf")
    if dest.exists() and not force:
        raise UserError(f"{dest} exists; pass --force to replace it")
    if not dest.parent.is_dir():
        raise UserError(f"{dest.parent} is not a directory")


def export_gguf(source: str | Path, dest: str | Path, qtype: str | None = None,
                floats: str = "f32", force: bool = False, layout: str = "auto") -> dict:
    """Write ``source`` (a ptq output, or with ``qtype`` a plain diffusers model folder or
    output) as ``dest`` (.gguf). Returns what went where: carried / requantised / float layers,
    and the ``layout`` written (``original`` or ``diffusers``; ``auto``: original where known).

    Raises UserError, before writing anything, for a class diffusers cannot load from a single
    file, a structural change the class's config does not express, or an output without ptq
    and no ``qtype``."""
    gguf = _gguf()
    dest = Path(dest)
    _check_dest(dest, force)
    if qtype is not None and qtype not in PLAIN_TYPES:
        raise UserError(f"--type {qtype}: choose one of {', '.join(PLAIN_TYPES)}")
    if floats not in ("f32", "f16"):
        raise UserError("--float: f32 or f16")
    if layout not in ("auto", "original", "diffusers"):
        raise UserError("--layout: auto, original or diffusers")
    tr, manifest = _load(Path(source), qtype is not None)
    cls = type(tr).__name__
    if layout == "original" and gguf_layout.architecture(cls) is None:
        raise UserError(f"export-gguf --layout original: not known for {cls} (known: "
                        f"{', '.join(gguf_layout.LAYOUTS)}); use --layout diffusers")
    if layout == "auto":
        layout = "original" if gguf_layout.converts_back(cls, dict(tr.config)) else "diffusers"
    if cls not in single_file_classes():
        raise UserError(f"export-gguf: diffusers cannot load a {cls} from a single file, so a "
                        f"GGUF of it would not load; supported: SD3, FLUX, Sana and "
                        f"{len(single_file_classes()) - 3} other classes")
    _check_stock_shapes(tr)
    report = {"carried": [], "requantised": [], "float_layers": [], "layout": layout}
    arch = gguf_layout.architecture(cls) if layout == "original" else "dit_compress"
    writer = gguf.GGUFWriter(None, arch=arch)
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        tensors = list(_layer_tensors(gguf, tr, qtype, floats, report))
        if layout == "original":
            try:
                tensors, stacked = gguf_layout.to_original(cls, tensors, gguf)
            except KeyError as e:
                raise UserError(f"export-gguf: {cls} tensor {e.args[0]} has no place in the "
                                "original checkpoint layout this tool knows; write it with "
                                "--layout diffusers") from None
            report["requantised"] += [n.rpartition(".")[0] for n in stacked
                                      if n.rpartition(".")[0] not in report["requantised"]]
        for name, arr, t in tensors:
            kind = getattr(gguf.GGMLQuantizationType, t)
            if t in ("F32", "F16"):
                writer.add_tensor(name, arr)
            else:
                writer.add_tensor(name, arr, raw_dtype=kind)
        writer.add_string("dit_compress.class", cls)
        writer.add_string("dit_compress.layout", layout)
        writer.add_string("dit_compress.config", json.dumps(dict(tr.config)))
        writer.add_string("dit_compress.requantised", json.dumps(report["requantised"]))
        if manifest is not None:
            writer.add_string("dit_compress.recipe", json.dumps(manifest.get("recipe")))
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    report["bytes"] = dest.stat().st_size
    return report


def _load(source: Path, plain: bool) -> tuple[nn.Module, dict | None]:
    manifest_path = source / "transformer" / "compress_manifest.json"
    if not manifest_path.is_file():
        manifest_path = source / "compress_manifest.json"
    if manifest_path.is_file():
        import compress

        manifest = json.loads(manifest_path.read_text())
        names = [p["name"] for p in manifest.get("passes", [])]
        if "ptq" not in names and not plain:
            raise UserError(f"{source}: no ptq pass in this output; give --type (Q8_0, Q4_0, "
                            "...) to quantise it for the GGUF file")
        bad = [n for n in names if n not in ("ptq", "distill", "prune_depth")]
        if bad:
            raise UserError(f"{source}: {bad[0]} changed the model in a way the stock class's "
                            "config does not express; GGUF export takes ptq (after distill or "
                            "depth pruning) outputs")
        pipe = compress.load_pipeline(source)
        return pipe.transformer, manifest
    from compress.models import load_model

    if not plain:
        raise UserError(f"{source} is not a dit-compress output; give --type to quantise a "
                        "plain model")
    return load_model(str(source)).transformer, None


def _check_stock_shapes(tr: nn.Module) -> None:
    from accelerate import init_empty_weights

    with init_empty_weights():
        sk = type(tr).from_config(dict(tr.config))
    want = {k: tuple(v.shape) for k, v in sk.state_dict().items()}
    qnames = {n for n, _ in quantised_modules(tr)}
    have = {k: tuple(v.shape) for k, v in tr.state_dict().items()
            if not any(k.startswith(q + ".") for q in qnames)}
    extra = [k for k in have if k not in want]
    wrong = [k for k in have if k in want and have[k] != want[k]]
    if extra or wrong:
        k = (extra or wrong)[0]
        raise UserError(f"export-gguf: the model's {k} does not match what the stock "
                        f"{type(tr).__name__} builds from its config; cannot write a loadable "
                        "single file")
