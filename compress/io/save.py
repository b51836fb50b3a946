"""Write a compressed model: pipeline components, transformer weights, manifest, recipe, report.

Everything goes into a temporary sibling of ``out`` that is renamed into place at the end, so an
interrupted run leaves nothing half-written; an existing non-empty ``out`` is refused unless
``force``; the input model is only ever read.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from compress.errors import UserError
from compress.io.files import copy_tree
from compress.io.manifest import MANIFEST, write_manifest

WEIGHTS = "diffusion_pytorch_model.safetensors"
SHARD_BYTES = 4 * 1024**3


def check_out_dir(out: Path, force: bool, source: Path | None = None, need: int = 0) -> None:
    """Refuse an output that would overwrite the input or an existing non-empty directory, or
    that would not fit in the free space where it is written (``need`` bytes, estimated)."""
    out = Path(out)
    if source is not None:
        src = Path(source).resolve()
        o = out.resolve()
        if o == src or src in o.parents or o in src.parents:
            raise UserError(f"--out {out}: overlaps the input model {source}; choose another path")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    _check_writable(out)
    _check_replaceable(out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: exists and is not empty; pass --force to replace it")
    if need:
        parent = _existing_parent(out)
        free = shutil.disk_usage(parent).free
        if free < need:
            raise UserError(f"--out {out}: {free / 1e6:.0f} MB free in {parent}, the output may "
                            f"take up to {need / 1e6:.0f} MB; free some space or choose another "
                            "folder")


def _existing_parent(out: Path) -> Path:
    """``out``'s parent, or its nearest existing ancestor (the run creates the folders in it)."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _check_writable(out: Path) -> None:
    """The output goes to a temporary sibling of ``out``: its parent (or the nearest existing
    ancestor) must take a new file."""
    parent = _existing_parent(out)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=parent)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write in {parent} ({exc.strerror}); choose a "
                        "writable folder") from None
    os.close(fd)
    os.unlink(probe)


def _check_replaceable(out: Path) -> None:
    """An existing ``out`` is renamed aside at the very end (write_output): refuse now what
    cannot be renamed, instead of failing after all the work."""
    if not out.is_dir() or out.is_symlink():  # a symlink is renamed itself, not its target
        return
    if os.path.ismount(out):
        raise UserError(f"--out {out}: is a mount point, which cannot be replaced; name a new "
                        f"folder inside it (e.g. --out {out / 'compressed'})")
    # in a sticky folder (like /tmp) only the owner of an entry or of the folder may rename it
    parent = out.absolute().parent
    uid = getattr(os, "geteuid", lambda: 0)()
    st = parent.stat()
    if st.st_mode & stat.S_ISVTX and uid not in (0, st.st_uid, out.stat().st_uid):
        raise UserError(f"--out {out}: belongs to another user in the sticky folder {parent}, "
                        "so it cannot be replaced; choose another path")


def save_transformer_weights(transformer: torch.nn.Module, tdir: Path) -> int:
    """Save the state dict as safetensors shards; returns the bytes of tensor data written."""
    sd = {}
    seen: dict[int, str] = {}
    for k, v in transformer.state_dict().items():
        if v.device.type == "meta":
            raise RuntimeError(f"tensor {k} is still on the meta device")
        ptr = v.data_ptr()
        # safetensors refuses shared storage: store a private copy of a tied tensor
        sd[k] = v.detach().contiguous().clone() if ptr in seen else v.detach().contiguous()
        seen[ptr] = k
    total = sum(t.numel() * t.element_size() for t in sd.values())
    if total <= SHARD_BYTES:
        save_file(sd, str(tdir / WEIGHTS), metadata={"format": "pt"})
        return total
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        b = v.numel() * v.element_size()
        if size + b > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += b
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tdir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tdir / f"{WEIGHTS}.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_output(
    out: Path,
    *,
    handle,
    manifest: dict,
    recipe_yaml: str,
    write_extras: Callable[[Path], None] | None = None,
    force: bool = False,
) -> Path:
    """Write the whole output directory atomically. ``write_extras(tmp)`` adds report files."""
    out = Path(out)
    check_out_dir(out, force, handle.source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        is_pipeline = handle.pipeline is not None
        if is_pipeline:
            _copy_pipeline_components(handle, tmp)
            tdir = tmp / "transformer"
        else:
            tdir = tmp
        if tdir.exists():
            shutil.rmtree(tdir)
        tdir.mkdir(parents=True)
        if hasattr(handle.transformer, "save_config"):
            handle.transformer.save_config(tdir)
            if _stock_cannot_run(manifest):
                _mark_for_compress(tmp if is_pipeline else None, tdir)
        save_transformer_weights(handle.transformer, tdir)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        if write_extras is not None:
            write_extras(tmp)
        # last: the manifest records the size and SHA-256 of every other file written
        from compress.io.integrity import record

        write_manifest(tdir, {**manifest, "files": record(tmp, {tdir / MANIFEST})})
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# the transformer class stock diffusers sees in a format-changed output: a name it does not have,
# so `DiffusionPipeline.from_pretrained(OUT)` stops with an error naming it (instead of loading
# random weights for the quantised layers and drawing NaN); the real class is in the manifest
STOCK_MARKER = "QuantizedByDitCompress_LoadWith_compress_load_pipeline"


def _stock_cannot_run(manifest: dict) -> bool:
    from compress.registry import get_pass

    return any(get_pass(p["name"]).kind == "format" for p in manifest.get("passes", []))


def _mark_for_compress(root: Path | None, tdir: Path) -> None:
    cfg = tdir / "config.json"
    data = json.loads(cfg.read_text())
    data["_class_name"] = STOCK_MARKER
    cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    index = root / "model_index.json" if root is not None else None
    if index is not None and index.is_file():
        data = json.loads(index.read_text())
        if isinstance(data.get("transformer"), list) and len(data["transformer"]) == 2:
            data["transformer"] = ["diffusers", STOCK_MARKER]
            index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _copy_pipeline_components(handle, tmp: Path) -> None:
    src = handle.source
    if src is not None and str(src) == "demo":
        from compress.demo import materialize_demo

        materialize_demo(tmp)
        return
    src = Path(src)
    for child in src.iterdir():
        if child.name in ("transformer", "recipe.yaml") or child.name.startswith("report."):
            continue
        copy_tree(child, tmp / child.name)
