"""Load a dit-compress output: rebuild the transformer's modules on an empty model from the
manifest, then load the stored tensors into them (no full-precision copy of quantised layers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from compress.errors import UserError, first_line
from compress.io import integrity
from compress.io.integrity import inside
from compress.io.manifest import MANIFEST, read_manifest
from compress.io.save import WEIGHTS


def _shards(index: Path) -> list[str]:
    try:
        wm = json.loads(index.read_text())["weight_map"]
        names = sorted(set(wm.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{index}: not a shard index (damaged or edited); re-run the recipe"
                        ) from None
    if not all(isinstance(n, str) for n in names):
        raise UserError(f"{index}: a shard name is not a string; re-run the recipe")
    return names


def _state_dict(tdir: Path) -> dict[str, torch.Tensor]:
    index = tdir / f"{WEIGHTS}.index.json"
    files = _shards(index) if index.is_file() else [WEIGHTS]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        p = inside(tdir, f, "the shard index")
        if not p.is_file():
            raise UserError(f"{p}: missing weights file; the output is incomplete")
        try:
            sd.update(load_file(str(p)))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"{p}: unreadable safetensors file ({exc}); re-run the recipe") from None
    return sd


def own_memory_(obj) -> None:
    """Give every parameter and buffer of ``obj`` (a module or a pipeline) its own allocation.

    Tensors read from safetensors sit wherever their file offset puts them, and oneDNN/MKL pick
    kernels by pointer alignment: the same weights at another offset can give results that
    differ in the last bit. Copying into fresh (64-byte aligned) memory makes a model loaded
    from any file compute exactly like one built in memory, which bit-equal reloads rely on.
    """
    modules = [obj] if isinstance(obj, torch.nn.Module) else [
        m for m in getattr(obj, "components", {}).values() if isinstance(m, torch.nn.Module)]
    with torch.no_grad():
        for root in modules:
            for m in root.modules():
                for name, t in list(m._parameters.items()):
                    if t is not None and t.device.type == "cpu":
                        t.data = t.data.clone()
                for name, t in list(m._buffers.items()):
                    if t is not None and t.device.type == "cpu":
                        m._buffers[name] = t.clone()


def _rebuild(module: torch.nn.Module, manifest: dict, tdir: Path, todo: str) -> None:
    """Run every pass's restore on ``module`` as the manifest says; any failure is one line."""
    from pydantic import ValidationError

    from compress.registry import all_passes

    passes = all_passes()
    for i, p in enumerate(manifest["passes"]):
        defn = passes.get(p["name"])
        if defn is None:
            raise UserError(f"{tdir}: pass {p['name']!r} (passes[{i}]) is unknown to this "
                            "dit-compress; upgrade it")
        try:
            cfg = defn.config.model_validate(p["config"])
        except ValidationError as exc:
            e = exc.errors()[0]
            raise UserError(f"{tdir}: passes[{i}] ({p['name']}) config "
                            f"{'.'.join(map(str, e['loc']))}: {e['msg']}; the output is damaged "
                            "or from another version: re-run the recipe") from None
        try:
            defn.restore(module, cfg, p["meta"])
        except UserError:
            raise
        except (AttributeError, LookupError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"{tdir}: passes[{i}] ({p['name']}) cannot be rebuilt on this "
                            f"model ({first_line(exc)}); {todo}") from None


def load_transformer(tdir: str | Path, device: str | torch.device = "cpu",
                     verify: bool = False) -> torch.nn.Module:
    """The compressed transformer alone, from a ``transformer/`` dir (or a transformer-only output).

    Every file the manifest lists is checked for its size and header; ``verify=True`` checks
    its whole SHA-256 too (see README: Integrity for the cost)."""
    import diffusers
    from accelerate import init_empty_weights

    tdir = Path(tdir)
    manifest = read_manifest(tdir)
    integrity.check(tdir, manifest, hashes=verify)
    if manifest["family"] == "generic":
        raise UserError(
            f"{tdir}: holds your own module ({manifest['transformer_module']}."
            f"{manifest['transformer_class']}), not a diffusers model: build a fresh instance "
            "with the same config and call compress.load_module(out, module)")
    name = manifest["transformer_class"]
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise UserError(f"{tdir}: transformer class {name} is unknown to this diffusers version "
                        f"({diffusers.__version__}); install the one it was compressed with")
    redo = "the output is damaged or from another version: re-run the recipe"
    try:
        config = cls.load_config(tdir)
        with init_empty_weights(include_buffers=False):
            tr = cls.from_config(config)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types on a bad config
        raise UserError(f"{tdir}/config.json: {cls.__name__} cannot be built from it "
                        f"({type(exc).__name__}); {redo}") from None
    _rebuild(tr, manifest, tdir, redo)
    sd = _state_dict(tdir)
    tr = _fill(tr, sd, tdir, device, "weights do not match the manifest", redo)
    _attach_lora(tr, manifest)
    return tr


def _fill(module: torch.nn.Module, sd: dict[str, torch.Tensor], tdir: Path, device,
          what: str, todo: str) -> torch.nn.Module:
    """Load ``sd`` into a rebuilt (meta-device) module; every tensor must get a stored value
    of the shape the rebuilt layer has, and an integer tensor (codes, packed nibbles) the
    dtype it has: so a manifest that disagrees with the stored tensors is refused."""
    have = dict(module.named_parameters()) | dict(module.named_buffers())
    missing = sorted(set(have) - set(sd))
    missing = [k for k in missing if k in module.state_dict()]
    unexpected = sorted(set(sd) - set(module.state_dict()))
    if missing or unexpected:
        raise UserError(f"{tdir}: {what} (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                        f"{todo}")
    for k, v in sd.items():
        t = have.get(k)
        if t is None:
            continue
        if tuple(t.shape) != tuple(v.shape):
            raise UserError(f"{tdir}: {k} is stored with shape {tuple(v.shape)}, the manifest's "
                            f"layer has {tuple(t.shape)}; {todo}")
        if t.dtype != v.dtype and not (t.dtype.is_floating_point and v.dtype.is_floating_point):
            raise UserError(f"{tdir}: {k} is stored as {v.dtype}, the manifest's layer holds "
                            f"{t.dtype}; {todo}")
    try:
        module.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{tdir}: {what} ({first_line(exc)}); {todo}") from None
    still_meta = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
                  if t.device.type == "meta"]
    if still_meta:
        raise UserError(f"{tdir}: no stored value for {still_meta[:3]}; the output is damaged")
    own_memory_(module)
    module = module.to(device).eval()
    from compress.modules.w8a8 import W8A8Linear

    for m in module.modules():  # weights packed once, here: torch.compile then traces no setup
        if isinstance(m, W8A8Linear):
            m.prepare()
    from compress.modules import attention

    return attention.enable(module)  # the matmul form of attention where it times faster


def _attach_lora(module: torch.nn.Module, manifest: dict) -> None:
    # LoRA files made for the original load on the output (compress.lora): PEFT learns our
    # layers, and diffusers' load_lora_adapter re-addresses keys where the structure changed
    from compress.lora.load import attach

    attach(module, manifest["passes"])


def load_module(out: str | Path, module: torch.nn.Module,
                device: str | torch.device = "cpu", verify: bool = False) -> torch.nn.Module:
    """Restore a compressed output of your own module onto a fresh instance of its class.

    The instance may be untrained (its weights are replaced) but must be built with the same
    configuration as the one that was compressed. Its layers are rebuilt as the manifest says
    (lists of blocks registered, torch attention unfused, quantised layers swapped in) and the
    stored tensors loaded, so it computes bit-equal to the compressed module of the run.

    Args:
        out: a directory written by ``run_recipe(..., model=module, out=out)``.
        module: a freshly built instance of the same class and config; changed in place.
        device: where to put it.
        verify: also check every file's SHA-256 against the manifest (sizes always are).

    Returns:
        ``module``, compressed, in eval mode.
    """
    from compress.models.generic import restore_prepared

    tdir = Path(out)
    if not tdir.is_dir():
        raise UserError(f"{tdir}: no such directory")
    if (tdir / "model_index.json").is_file():
        raise UserError(f"{tdir}: a diffusers pipeline output; load it with compress.load_pipeline")
    manifest = read_manifest(tdir)
    integrity.check(tdir, manifest, hashes=verify)
    want = manifest["transformer_class"]
    if type(module).__name__ != want:
        raise UserError(f"{tdir}: compressed from a {manifest['transformer_module']}."
                        f"{want}, got a {type(module).__name__}; build the same class")
    if manifest["prepared"]:
        try:
            restore_prepared(module, manifest["prepared"])
        except (AttributeError, LookupError, TypeError, ValueError) as exc:
            raise UserError(f"{tdir}: the module cannot be prepared as the manifest says "
                            f"({first_line(exc)}); build it with the same config"
                            ) from None
    expected = {k: (tuple(v.shape), v) for k, v in module.state_dict(keep_vars=True).items()}
    _rebuild(module, manifest, tdir, "build the module with the config it was compressed from "
             "(or re-run the recipe if the output is damaged)")
    sd = _state_dict(tdir)
    kept = dict(module.named_parameters()) | dict(module.named_buffers())
    for k, v in sd.items():  # layers the passes left as they were must match in shape
        if k in expected and kept.get(k) is expected[k][1] and expected[k][0] != tuple(v.shape):
            raise UserError(f"{tdir}: {k} is stored with shape {tuple(v.shape)} but the module has "
                            f"{expected[k][0]}; build it with the config it was compressed from")
    module = _fill(module, sd, tdir, device, "the module does not match the output",
                   "build it with the config it was compressed from")
    _attach_lora(module, manifest)
    return module


def load_pipeline(out: str | Path, device: str | torch.device = "cpu", verify: bool = False):
    """A compressed output as a diffusers pipeline (or the transformer alone if that is all it holds).

    Args:
        out: a directory written by ``dit-compress run``.
        device: where to put the pipeline.
        verify: also check every file's SHA-256 against the manifest (sizes always are).

    Returns:
        The diffusers pipeline with the compressed transformer inside; for a transformer-only
        output, the transformer module.
    """
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out}: no such directory")
    if (out / "model_index.json").is_file():
        tdir = out / "transformer"
        if not (tdir / MANIFEST).is_file():
            raise UserError(f"{out}: no transformer/{MANIFEST}; not a dit-compress output")
        tr = load_transformer(tdir, device, verify=verify)
        import diffusers
        from diffusers import DiffusionPipeline

        from compress.io.save import STOCK_MARKER

        # model_index.json names a class stock diffusers lacks (so that its from_pretrained
        # refuses the output); diffusers checks a passed component against that name, so the
        # name stands for the real class during this one call only
        setattr(diffusers, STOCK_MARKER, type(tr))
        try:
            pipe = DiffusionPipeline.from_pretrained(str(out), transformer=tr, use_safetensors=True)
        except Exception as exc:  # noqa: BLE001 - diffusers/transformers raise many types
            raise UserError(f"{out}: a pipeline component does not load ({first_line(exc)}); "
                            f"the output is damaged: `dit-compress verify {out}` names "
                            "the file, re-run the recipe") from None
        finally:
            delattr(diffusers, STOCK_MARKER)
        own_memory_(pipe)
        from compress.lora.load import attach_pipeline

        attach_pipeline(pipe)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    return load_transformer(out, device, verify=verify)
