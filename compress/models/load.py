"""Open a model directory as a ModelHandle: checks first (safetensors only, no custom code, no
truncated files), then diffusers' own loader; never writes to disk."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from compress.errors import UserError, first_line
from compress.models.base import ModelHandle

MANIFEST = "compress_manifest.json"  # marks a dit-compress output (see compress.io.manifest)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Libraries whose classes diffusers may instantiate for a pipeline component. Anything else
# would make diffusers import Python code found next to the weights.
TRUSTED_LIBRARIES = {"diffusers", "transformers"}
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
    "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}  # fmt: skip
_HASH_FULL_LIMIT = 64 << 20  # small files (configs, tokenizers) are hashed whole


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable JSON ({exc}); restore the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object; restore the file")
    return data


def safetensors_header(path: Path) -> bytes:
    """The raw header of a safetensors file after checking the file holds every tensor it lists.

    Raises:
        UserError: the file is truncated, padded or its header is corrupted.
    """
    bad = f"{path}: truncated or corrupted safetensors file"
    fix = "re-download or re-save the model"
    size = path.stat().st_size
    if size < 8:
        raise UserError(f"{bad} ({size} bytes); {fix}")
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise UserError(f"{bad} (header claims {n} bytes, file has {size}); {fix}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{bad} (header is not JSON); {fix}") from None
    end = 0
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = (int(x) for x in info["data_offsets"])
            want = math.prod(int(d) for d in info["shape"]) * _DTYPE_BYTES.get(info["dtype"], 0)
            if stop < start or (info["dtype"] in _DTYPE_BYTES and stop - start != want):
                raise UserError(f"{bad} (tensor {name} has inconsistent offsets); {fix}")
            end = max(end, stop)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(f"{bad} (malformed header entry); {fix}") from None
    if 8 + n + end != size:
        raise UserError(f"{bad} (expected {8 + n + end} bytes, found {size}); {fix}")
    return raw


def _check_component(cdir: Path) -> list[Path]:
    """Checks one component dir's weights; returns its safetensors files (maybe none)."""
    files = sorted(cdir.glob("*.safetensors"))
    for index in sorted(cdir.glob("*.safetensors.index.json")):
        for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
            if not (cdir / shard).is_file():
                raise UserError(
                    f"{cdir / shard}: shard listed in {index.name} is missing; "
                    "re-download the model"
                )
    if not files:
        pickles = sorted(p for p in cdir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(
                f"{pickles[0]}: weights only in pickle form; dit-compress loads safetensors only "
                "(convert them with diffusers' save_pretrained(..., safe_serialization=True))"
            )
    for f in files:
        safetensors_header(f)
    return files


_WEIGHTS_FULL_LIMIT = 64 << 20
_SAMPLES, _SAMPLE_BYTES = 32, 64 << 10


def _hash_weights(h: Any, f: Path, size: int) -> None:
    """Weights whole up to 64 MB; above, the header and 32 chunks of 64 KB spread over the file
    (a retrained checkpoint of the same shapes changes them all; reading stays milliseconds)."""
    if size <= _WEIGHTS_FULL_LIMIT:
        h.update(f.read_bytes())
        return
    h.update(safetensors_header(f))
    with open(f, "rb") as fh:
        for i in range(_SAMPLES):
            fh.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
            h.update(fh.read(_SAMPLE_BYTES))


def _hash_dir(h: Any, root: Path, sub: Path) -> None:
    """Feeds a directory into ``h``: weights by content (sampled when large), small files whole."""
    for f in sorted(p for p in sub.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if any(part.startswith(".") for part in f.relative_to(root).parts):
            continue
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if f.suffix == ".safetensors":
            _hash_weights(h, f, size)
        elif size <= _HASH_FULL_LIMIT and f.suffix not in PICKLE_SUFFIXES:
            h.update(f.read_bytes())


def source_hash(root: Path, tdir: Path, components: list[str]) -> str:
    """sha256 over the transformer's files and, for a pipeline, every other component's.

    Weights count by content (whole up to 64 MB, sampled above), so hashing a 12B model takes
    milliseconds and a retrained checkpoint of the same shapes gets a new hash; the other components are included because calibration inputs and teacher
    images depend on the text encoders and VAE too.
    """
    h = hashlib.sha256()
    _hash_dir(h, tdir, tdir)
    if root != tdir:
        h.update(b"\0pipeline\0")
        h.update((root / "model_index.json").read_bytes())
        for name in components:
            if name != tdir.name and (root / name).is_dir():
                _hash_dir(h, root, root / name)
    return h.hexdigest()


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")


def _supported(adapters: dict) -> str:
    return ", ".join(sorted(c for a in adapters.values() for c in a.transformer_classes))


def _pipeline_layout(root: Path) -> tuple[str, list[str]]:
    """The transformer class named in model_index.json and the component names; refuses
    pipelines that would run code from the directory."""
    import diffusers

    from compress.models import ADAPTERS

    index_path = root / "model_index.json"
    index = _read_json(index_path)
    pipe_cls = index.get("_class_name")
    if not isinstance(pipe_cls, str) or not hasattr(diffusers, pipe_cls):
        raise UserError(
            f"{index_path}: pipeline class {pipe_cls!r} is not part of diffusers; "
            "custom pipeline code is never run, use a stock diffusers pipeline"
        )
    components = []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library = value[0]
        if library is not None and library not in TRUSTED_LIBRARIES:
            raise UserError(
                f"{index_path}: component {name!r} comes from {library!r}; only "
                "diffusers and transformers components load (no custom code)"
            )
        if library is not None:
            components.append(name)
    entry = index.get("transformer")
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        found = ", ".join(f"{n} ({index[n][1]})" for n in components) or "none"
        raise UserError(
            f"{root}: {pipe_cls} has no transformer component (found: {found}); "
            f"supported transformers: {_supported(ADAPTERS)}"
        )
    return str(entry[1]), components


def _adapter(cls_name: str, where: Path):
    from compress.models import ADAPTERS, adapter_for_class

    adapter = adapter_for_class(cls_name)
    if adapter is None:
        raise UserError(
            f"{where}: transformer class {cls_name} is not supported; supported: "
            f"{_supported(ADAPTERS)}"
        )
    return adapter


def _refuse_missing_weights(transformer: torch.nn.Module, tdir: Path) -> None:
    """diffusers leaves the tensors its config names but its weights lack on the meta device
    (a config.json that disagrees with the weights file): refuse that before any work."""
    missing = [n for n, t in (*transformer.named_parameters(), *transformer.named_buffers())
               if t.is_meta]
    if missing:
        raise UserError(f"{tdir}: config.json describes {len(missing)} tensors the weights file "
                        f"lacks (first: {missing[0]}); the config and the weights belong to "
                        "different models: restore the checkpoint's own config.json")


def _load_error(where: Path, exc: Exception) -> UserError:
    return UserError(
        f"{where}: diffusers could not load it ({first_line(exc, 200)}); "
        "check the directory is a complete diffusers checkpoint"
    )


def _load_demo(device: str | torch.device, dtype: torch.dtype | None) -> ModelHandle:
    # Lazy: the demo package pulls in its own weights and text encoder.
    from compress.demo import demo_dir, load_demo_pipeline
    from compress.models import adapter_for

    pipe = load_demo_pipeline(dtype=dtype or torch.float32, device=device)
    root = Path(demo_dir())
    digest = None
    if (root / "model_index.json").is_file() and (root / "transformer").is_dir():
        # The demo's text encoder ships in another package at a pinned version, so the
        # shipped dir's files identify the demo.
        digest = source_hash(root, root / "transformer", _pipeline_layout(root)[1])
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return ModelHandle(
        transformer=pipe.transformer,
        adapter=adapter_for(pipe.transformer),
        pipeline=pipe,
        source=Path("demo"),
        source_hash=digest,
    )


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> ModelHandle:
    """Load a diffusers pipeline directory, or a transformer directory alone, as a ModelHandle.

    Args:
        path: a directory with ``model_index.json`` (a pipeline), a transformer directory
            (``config.json`` with ``_class_name``), a dit-compress output, or ``"demo"``.
        device: where to put the model.
        dtype: torch dtype (or "bf16", "fp16", "fp32"); None keeps the stored one.

    Returns:
        The handle; ``pipeline`` is None for a transformer directory.

    Raises:
        UserError: missing or non-diffusers path, unsupported transformer class, truncated or
            corrupted safetensors, pickle-only weights, or a load failure.
    """
    torch_dtype = _resolve_dtype(dtype)
    if str(path) == "demo":
        return _load_demo(device, torch_dtype)
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(
            f"{root}: no such file or directory; pass a local diffusers pipeline directory "
            "(hub ids are not downloaded: fetch the model first)"
        )
    if not root.is_dir():
        raise UserError(
            f"{root}: is a file; pass a diffusers pipeline (or transformer) directory, "
            "single-file checkpoints are not supported"
        )
    if (root / "model_index.json").is_file():
        cls_name, components = _pipeline_layout(root)
        tdir = root / "transformer"
        if not tdir.is_dir():
            raise UserError(f"{tdir}: missing transformer directory; the pipeline is incomplete")
        for name in components:
            if (root / name).is_dir():
                _check_component(root / name)
    elif (root / "config.json").is_file() and "_class_name" in _read_json(root / "config.json"):
        tdir, components = root, []
        cls_name = str(_read_json(root / "config.json")["_class_name"])
    else:
        raise UserError(
            f"{root}: not a diffusers directory (no model_index.json, no config.json "
            "with _class_name); point at a diffusers pipeline or transformer dir"
        )
    adapter = _adapter(cls_name, tdir)
    if not _check_component(tdir) and not (tdir / MANIFEST).is_file():
        raise UserError(f"{tdir}: no *.safetensors weights found; the checkpoint is incomplete")
    digest = source_hash(root, tdir, components)

    try:
        if (tdir / MANIFEST).is_file():
            from compress.io.load import load_pipeline, load_transformer

            pipe = load_pipeline(root) if tdir != root else None
            transformer = pipe.transformer if pipe is not None else load_transformer(tdir)
        elif tdir != root:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(
                root, use_safetensors=True, torch_dtype=torch_dtype, local_files_only=True
            )
            transformer = pipe.transformer
        else:
            import diffusers

            pipe = None
            transformer = getattr(diffusers, cls_name).from_pretrained(
                root, use_safetensors=True, torch_dtype=torch_dtype, local_files_only=True
            )
    except UserError:
        raise
    except Exception as exc:  # diffusers / safetensors / transformers raise many types
        raise _load_error(root, exc) from exc
    _refuse_missing_weights(transformer, tdir)

    target = pipe if pipe is not None else transformer
    if not (tdir / MANIFEST).is_file():
        from compress.io.load import own_memory_

        own_memory_(target)
    target.to(device)
    if torch_dtype is not None and (tdir / MANIFEST).is_file():
        target.to(dtype=torch_dtype)
    transformer.eval()
    if pipe is not None and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return ModelHandle(
        transformer=transformer, adapter=adapter, pipeline=pipe, source=root, source_hash=digest
    )
