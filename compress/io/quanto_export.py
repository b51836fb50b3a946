"""Export a ptq output to optimum-quanto's own format, so that quanto's ``requantize`` reads it.

What maps exactly (integer codes and scales carried over unchanged, scales stored as float32):
- weight-only int8 (``QLinear``), symmetric, per output channel -> ``qint8`` weights;
- weight-only int4 / int2 (``QLinear``, and ``Int4Linear`` for int4), symmetric or with a zero
  point, per channel or grouped, when every one of quanto's weight groups for that layer lies
  inside one of ours -> ``qint4`` / ``qint2`` (quanto picks the group itself from the input
  width: 128, else 96, 64, 32 dividing it, else one group per row; our scale and zero point
  are repeated over its groups);
- fp8 (e4m3) weights (``FP8Linear``), one scale per output channel -> ``qfloat8_e4m3fn``;
- ``QConv2d`` (a Conv2d whose flattened weight ``[out, in/groups*kh*kw]`` is held by one of the
  above) -> quanto's ``QConv2d`` with the same geometry, under the same rules: quanto groups a
  conv's flattened weight the same way (its group size comes from that same fan-in);
- static int8 activations with one scale (no timestep groups, no smoothing vector), with int8
  or per-channel int4 weights -> ``qint8`` activations whose ``input_scale`` is ours.
Bits may differ per layer: quanto's map is per layer. Everything else is refused with a
:class:`UserError` saying why. quanto also rounds the *output* of every layer with quantised
activations to int8 (a forward hook it always installs on reload); ours keeps it in float, so
``output_scale`` is measured here (abs-max / 127 over calibration inputs) and those outputs
differ from ours by that rounding.

Written layout (quanto's own ``QuantizedDiffusersModel`` layout): ``config.json``,
``quanto_qmap.json`` and ``diffusion_pytorch_model.safetensors`` (sharded with an index when
large), into a temporary sibling renamed into place. quanto rebuilds the model in float32 (the
empty model from config), which is why the scales are stored as float32.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compress.errors import UserError

QMAP = "quanto_qmap.json"
# weight-only layers of compress.modules that map, besides QLinear (matched by class name: they
# are imported only when a model holds them)
WEIGHT_ONLY = ("Int4Linear", "FP8Linear")
CONV = "QConv2d"  # a Conv2d around one of the weight-only matrices
CONFIG = "config.json"
_ACT_QMAX = 127.0  # quanto's per-tensor abs-max scale divides by int8's largest value


def _quanto():
    try:
        import optimum.quanto as q
    except ImportError:  # pragma: no cover - a declared dependency
        raise UserError("export-quanto needs optimum-quanto: pip install 'optimum-quanto>=0.2.7'") \
            from None
    return q


# ---------------------------------------------------------------------------------------------
# what can be represented


def _compress_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Our replacement modules (classes defined in compress.*), outermost first."""
    out = []
    for name, m in root.named_modules():
        ours = type(m).__module__.startswith("compress.") and m is not root
        if ours and not any(name.startswith(p + ".") for p, _ in out):
            out.append((name, m))
    return out


def _refuse(name: str, why: str, instead: str) -> UserError:
    return UserError(f"export-quanto: {name}: {why}; {instead}")


def _quanto_group(q, in_f: int, out_f: int, qtype) -> int | None:
    """The group size quanto itself will choose for this layer on reload (None: per row).

    quanto derives it from ``weight.numel() // out`` for Linear and Conv2d alike, so for a conv
    ``in_f`` is the flattened fan-in ``in/groups * kh * kw``.
    """
    probe = q.QLinear(in_f, out_f, False, device="meta", weights=qtype)
    return probe.weight_group_size


def _contiguous(shape: tuple[int, ...]) -> tuple[torch.Size, tuple[int, ...]]:
    return torch.Size(shape), torch.empty(shape, device="meta").stride()


def _per_row(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[out] or [out, 1] -> [out, 1, ...] broadcasting against a weight of ``shape``."""
    return t.reshape(shape[0], *([1] * (len(shape) - 1))).contiguous()


def _expand_groups(name: str, in_f: int, span: int, n_ours: int, gq: int | None) -> torch.Tensor:
    """Index of our group for each of quanto's groups, or refuse when one straddles two of ours.

    Our group ``k`` holds inputs ``[k*span, (k+1)*span)``; quanto's hold ``gq`` inputs each.
    """
    ours = torch.arange(in_f) // span
    if gq is None:
        if n_ours != 1:
            raise _refuse(
                name, f"groups of {span} inputs, but quanto keeps one scale per row for {in_f} "
                "inputs", "use granularity: channel for this layer")
        return torch.zeros(1, dtype=torch.long)
    blocks = ours.view(-1, gq)
    if not bool((blocks == blocks[:, :1]).all()):
        raise _refuse(
            name, f"groups of {span} inputs do not fit quanto's groups of {gq} for {in_f} inputs",
            f"re-run ptq with weights.group_size: {gq} (or a multiple) or granularity: channel")
    return blocks[:, 0]


def _qbits_weight(q, name: str, codes: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor | None, bits: int, span: int,
                  shape: tuple[int, ...] | None = None):
    """Unsigned codes [out, in] (offset 2**(bits-1) when symmetric), scales [out, groups of
    ``span`` inputs] -> quanto WeightQBitsTensor on quanto's own grouping.

    ``shape``: the weight's own shape when it is not [out, in] (a conv kernel [out, c, kh, kw],
    whose row-major flattening is ``codes``); quanto's groups of a contiguous tensor are
    ``reshape(-1, group)`` of it, i.e. the same runs of inputs along each flattened row.
    """
    qtype = {4: q.qint4, 2: q.qint2}[bits]
    out_f, in_f = codes.shape
    shape = tuple(shape) if shape is not None else (out_f, in_f)
    gq = _quanto_group(q, in_f, out_f, qtype)
    idx = _expand_groups(name, in_f, span, scale.shape[1], gq)
    s = scale.float()[:, idx].reshape(-1, 1).contiguous()
    if zero is None:
        shift = torch.full_like(s, 2 ** (bits - 1), dtype=torch.uint8)
    else:
        shift = zero[:, idx].reshape(-1, 1).to(torch.uint8).contiguous()
    data = codes.to(torch.uint8)
    if gq is not None:
        data = data.reshape(-1, gq).contiguous()
    else:  # one scale per row: data keeps the weight's shape, scales broadcast against it
        data, s, shift = data.reshape(shape).contiguous(), _per_row(s, shape), _per_row(shift, shape)
    size, stride = _contiguous(shape)
    w = q.WeightQBitsTensor(qtype, 0, gq, size, stride, data, s, shift)
    return qtype, w


def _qbytes_weight(q, codes: torch.Tensor, scale: torch.Tensor, act_qtype, qtype=None,
                   shape: tuple[int, ...] | None = None):
    """8-bit codes [out, in] (int8, or float8 for a float qtype) and per-row scales -> quanto
    WeightQBytesTensor (default qint8) of ``shape`` (default [out, in])."""
    qtype = q.qint8 if qtype is None else qtype
    out_f, in_f = codes.shape
    shape = tuple(shape) if shape is not None else (out_f, in_f)
    data = codes if qtype.is_floating_point else codes.to(torch.int8)
    size, stride = _contiguous(shape)
    w = q.WeightQBytesTensor(qtype, 0, size, stride, data.reshape(shape).contiguous(),
                             _per_row(scale.float(), shape), act_qtype)
    return qtype, w


def _int_codes(m) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(bits, unsigned codes [out, in], scale [out, groups], zero or None, inputs per group)."""
    from compress.quant import kernels, qtensor

    if type(m).__name__ == "Int4Linear":
        codes = kernels.unpack_int4(m.qweight, m.group_size)[:, : m.in_features]
        return 4, codes, m.scale, m.zero, m.group_size
    codes = qtensor.unpack(m.qweight, m.bits, m.in_features)
    return m.bits, codes, m.scale, m.zero, -(-m.in_features // m.scale.shape[1])


def _weight_only(q, name: str, m, shape: tuple[int, ...] | None = None) -> tuple:
    """(quanto weight qtype, quanto weight tensor) for a weight-only matrix ``m`` (of ``shape``
    when it is a conv's flattened kernel)."""
    if type(m).__name__ == "FP8Linear":
        # ours: fp32 scale per output channel, dequantised as float(code) * scale in fp32 --
        # exactly quanto's qfloat8 weight on axis 0 with float32 scales (a single scale is
        # repeated over the rows; any other layout is not one scale per row).
        out_f = m.qweight.shape[0]
        scale = m.scale.reshape(-1) if m.scale.numel() in (1, out_f) else None
        if scale is None or m.scale.dim() > 2 or (m.scale.dim() == 2 and m.scale.shape[1] != 1):
            raise _refuse(name, f"fp8 scales of shape {list(m.scale.shape)}, not one per output "
                          "channel as quanto's qfloat8_e4m3fn weights have",
                          "re-run ptq with weights.format: fp8_e4m3")
        scale = scale.expand(out_f)
        return _qbytes_weight(q, m.qweight, scale, None, q.qtypes["qfloat8_e4m3fn"], shape)
    bits, codes, scale, zero, span = _int_codes(m)
    if bits not in (2, 4, 8):
        raise _refuse(name, f"int{bits} weights have no quanto type (it has qint2, qint4, qint8)",
                      "re-run ptq with weights.bits 2, 4 or 8")
    if bits == 8:
        if zero is not None:
            raise _refuse(name, "int8 with a zero point; quanto's qint8 is symmetric",
                          "re-run ptq with weights.symmetric: true")
        if scale.shape[1] != 1:
            raise _refuse(name, "grouped int8; quanto's qint8 has one scale per row",
                          "re-run ptq with weights.granularity: channel")
        return _qbytes_weight(q, (codes.to(torch.int16) - 128).to(torch.int8), scale[:, 0], None,
                              shape=shape)
    return _qbits_weight(q, name, codes, scale, zero, bits, span, shape)


def _w8a8(q, name: str, m) -> tuple:
    from compress.modules.w4a8 import W4A8Linear
    from compress.quant import qtensor

    if m.act != "static":
        raise _refuse(name, "per-token (dynamic) activation scales; quanto only has static "
                      "per-tensor ones", "re-run ptq with activations.mode: static, or weight-only")
    if m.n_groups != 1:
        raise _refuse(name, f"{m.n_groups} timestep groups of activation scales; quanto has one "
                      "scale per layer", "re-run ptq with activations.timestep_groups: 1")
    if m.smooth is not None:
        raise _refuse(name, "a smoothing vector divides its input per channel, which quanto's "
                      "per-tensor input scale cannot express (and the preceding op is not a "
                      "foldable affine in general)", "re-run ptq with smoothing: null")
    if isinstance(m, W4A8Linear):
        codes = qtensor.unpack(m.qweight, 4, m.in_features)
        scale = m.weight_scale.float()[:, None]
        _, w = _qbits_weight(q, name, codes, scale, None, 4, m.in_features)
        return q.qint4, w
    return _qbytes_weight(q, m.weight, m.weight_scale, q.qint8)


def _plan(root: nn.Module) -> dict[str, nn.Module]:
    """Names of our layers to convert; refuses anything quanto cannot represent."""
    from compress.modules.qlinear import QLinear
    from compress.modules.w8a8 import W8A8Linear

    plan = {}
    for name, m in _compress_modules(root):
        kind = type(m).__name__
        if isinstance(m, (QLinear, W8A8Linear)) or kind in WEIGHT_ONLY:
            plan[name] = m
            continue
        if kind == CONV:
            inner = type(m.wq).__name__
            if not (isinstance(m.wq, QLinear) or inner in WEIGHT_ONLY):
                raise _refuse(name, f"a convolution whose weight is held by {inner} has no "
                              "quanto equivalent", "re-run ptq with weight-only int2/4/8 or fp8")
            plan[name] = m
            continue
        why = {"LowRankQLinear": "a 16-bit low-rank branch with int4 activations (W4A4) has no "
               "quanto equivalent", "W8A8FeedForward": "a fused int8 feed-forward is not an "
               "nn.Linear quanto can replace", "VQLinear": "vector-quantised weights "
               "(codebooks and indices) have no quanto equivalent"}
        raise _refuse(name, why.get(kind, f"{kind} has no quanto equivalent"),
                      "export weight-only int2/4/8 or fp8 Linear/Conv2d layers, or static "
                      "w8a8/w4a8")
    if not plan:
        raise UserError("export-quanto: no layer quantised by the ptq pass; nothing to export")
    return plan


def check_representable(transformer: nn.Module) -> None:
    """Raise UserError (one line: which layer, why, what to use) unless quanto can hold it all."""
    q = _quanto()
    for name, m in _plan(transformer).items():
        _convert_one(q, name, m)


# ---------------------------------------------------------------------------------------------
# conversion


def _convert_conv(q, name: str, m) -> nn.Module:
    """Our QConv2d -> quanto's frozen QConv2d (weight-only) with the same geometry and bias."""
    shape = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
    wq, w = _weight_only(q, name, m.wq, shape)
    bias = m.bias
    new = q.QConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                    padding=m.padding, dilation=m.dilation, groups=m.groups,
                    bias=bias is not None, padding_mode=m.padding_mode, device="meta",
                    dtype=torch.float32, weights=wq)
    if new.weight_group_size != getattr(w, "_group_size", None):  # pragma: no cover
        # quanto's QConv2d picks its group from the flattened fan-in, as probed for QLinear
        raise _refuse(name, f"quanto would group this conv's weight by {new.weight_group_size}",
                      "re-run ptq with granularity: channel")
    new.weight = nn.Parameter(w, requires_grad=False)
    new.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                      requires_grad=False)
    new.input_scale = torch.ones((), dtype=torch.float32)
    new.output_scale = torch.ones((), dtype=torch.float32)
    new.name = name
    return new.eval()


def _convert_one(q, name: str, m) -> nn.Module:
    from compress.modules.w8a8 import W8A8Linear

    if type(m).__name__ == CONV:
        return _convert_conv(q, name, m)
    act = None
    if isinstance(m, W8A8Linear):
        wq, w = _w8a8(q, name, m)
        act = q.qint8
    else:
        wq, w = _weight_only(q, name, m)
    bias = m.bias
    new = q.QLinear(m.in_features, m.out_features, bias is not None, device="meta",
                    dtype=torch.float32, weights=wq, activations=act, quantize_input=True)
    new.weight = nn.Parameter(w, requires_grad=False)
    new.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                      requires_grad=False)
    new.input_scale = torch.ones((), dtype=torch.float32)
    new.output_scale = torch.ones((), dtype=torch.float32)
    if act is not None:
        new.input_scale = m.act_scale.detach().float().reshape(()).clone()
    new.name = name
    return new.eval()


def output_absmax(transformer: nn.Module, calibrate_fn: Callable[[nn.Module], object],
                  names: list[str]) -> dict[str, float]:
    """Largest |output| of each named layer while ``calibrate_fn(transformer)`` runs."""
    seen: dict[str, float] = {}

    def hook(n):
        def f(_m, _i, out):
            seen[n] = max(seen.get(n, 0.0), float(out.detach().abs().max()))
        return f

    hooks = [transformer.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            calibrate_fn(transformer)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in names if n not in seen]
    if missing:
        raise UserError(f"export-quanto: calibration never ran {missing[0]} (and "
                        f"{len(missing) - 1} more); quanto needs its output range")
    return seen


def to_quanto(transformer: nn.Module,
              calibrate_fn: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """Replace our quantised layers in ``transformer`` (in place) by quanto's frozen QLinear
    (QConv2d for our quantised convolutions).

    Args:
        transformer: a model holding the ptq pass's layers (e.g. from ``load_transformer``).
        calibrate_fn: runs ``transformer`` on representative inputs; needed when layers have
            static activations, to measure the output range quanto quantises to int8.

    Returns:
        ``transformer``; ``optimum.quanto.quantization_map(it)`` and ``it.state_dict()`` are
        then what quanto's ``requantize`` reads.

    Raises:
        UserError: a layer quanto cannot represent, or static activations without calibrate_fn.
    """
    from compress.modules.swap import set_submodule
    from compress.modules.w8a8 import W8A8Linear

    q = _quanto()
    plan = _plan(transformer)
    # convert everything first: a layer quanto cannot hold is refused before anything changes
    new = {name: _convert_one(q, name, m) for name, m in plan.items()}
    static = [n for n, m in plan.items() if isinstance(m, W8A8Linear)]
    if static:
        if calibrate_fn is None:
            raise UserError(
                "export-quanto: static int8 activations: quanto also rounds each such layer's "
                "output to int8 and needs its range; pass calibrate_fn (or export from a run "
                "whose source model is available)")
        for n, amax in output_absmax(transformer, calibrate_fn, static).items():
            new[n].output_scale = torch.tensor(max(amax, 1e-8) / _ACT_QMAX)
    for name, m in new.items():
        set_submodule(transformer, name, m)
    return transformer


# ---------------------------------------------------------------------------------------------
# writing


def _check_dest(dest: Path, force: bool, source: Path | None) -> None:
    if source is not None:
        s, d = Path(source).resolve(), dest.resolve()
        if d == s or s in d.parents or d in s.parents:
            raise UserError(f"export-quanto: DEST {dest} overlaps OUT {source}; choose another path")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"export-quanto: DEST {dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise UserError(f"export-quanto: DEST {dest} exists and is not empty; pass --force")


def save_quanto(model: nn.Module, dest: str | Path, force: bool = False,
                config: dict | None = None, _source: Path | None = None) -> Path:
    """Write a model converted by :func:`to_quanto` to ``dest`` atomically.

    ``config`` (default: the model's own diffusers config) goes to config.json, so quanto's
    ``QuantizedDiffusersModel.from_pretrained`` or an empty model plus ``requantize`` reads it.
    """
    from compress.io.save import save_transformer_weights

    q = _quanto()
    dest = Path(dest)
    _check_dest(dest, force, _source)
    qmap = q.quantization_map(model)
    if not qmap:
        raise UserError("export-quanto: the model holds no quanto layer; call to_quanto first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        if config is None and hasattr(model, "save_config"):
            model.save_config(tmp)
        elif config is not None:
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_transformer_weights(model, tmp)
        (tmp / QMAP).write_text(json.dumps(qmap, indent=2))
        if dest.exists():
            trash = dest.parent / f".{dest.name}.old-{os.getpid()}"
            os.replace(dest, trash)
            os.replace(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _transformer_dir(out: Path) -> Path:
    if not out.is_dir():
        raise UserError(f"export-quanto: {out}: no such directory")
    return out / "transformer" if (out / "model_index.json").is_file() else out


def _calibration_from_run(manifest: dict, model: str | None, cache_dir: str | Path | None,
                          n_samples: int) -> Callable[[nn.Module], None]:
    """Replays the run's own calibration inputs (recaptured from its source model, cached)."""
    from compress.calib.capture import capture
    from compress.models import load_model
    from compress.recipe import validate
    from compress.runner import family_defaults, resolve_prompts

    source = model or (manifest.get("source") or {}).get("path")
    if source is None:
        raise UserError("export-quanto: static activations need calibration inputs and the "
                        "manifest names no source model; pass --model")
    handle = load_model(source)
    if handle.pipeline is None:
        raise UserError(f"export-quanto: {source} is not a pipeline; static activations need "
                        "its calibration prompts (use to_quanto(..., calibrate_fn) in Python)")
    cc = validate(manifest["recipe"]).calibration
    d = family_defaults(handle)
    prompts = resolve_prompts(cc.prompts, handle, "calibration", cc.num_prompts)
    calib = capture(
        handle, prompts, seeds=[cc.seed + i for i in range(len(prompts))],
        steps=cc.steps or d["steps"],
        guidance=cc.guidance if cc.guidance is not None else d["guidance"],
        resolution=cc.resolution or d["resolution"], capture_steps=cc.capture_steps,
        cache_dir=Path(cache_dir) if cache_dir else None,
    ).subset(max_samples=n_samples)

    def run(tr: nn.Module) -> None:
        for i in range(len(calib)):
            s = calib.sample(i)
            handle.adapter.call(tr, s.args, s.kwargs)

    return run


def export_quanto(out_dir: str | Path, dest_dir: str | Path, force: bool = False,
                  model: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Convert a ``dit-compress run`` output (its ptq layers) to quanto's format in ``dest_dir``.

    Args:
        out_dir: a pipeline output or a transformer-only output of ``dit-compress run``.
        dest_dir: where to write config.json, quanto_qmap.json and the safetensors weights.
        force: replace a non-empty ``dest_dir``.
        model: the source model, for static activations (default: the manifest's source).
        cache_dir: calibration cache root (as for ``run``).

    Raises:
        UserError: bad paths, or layers quanto cannot represent (nothing is written).
    """
    from compress.io.load import load_transformer
    from compress.io.manifest import read_manifest
    from compress.modules.w8a8 import W8A8Linear

    out = Path(out_dir)
    tdir = _transformer_dir(out)
    manifest = read_manifest(tdir)
    _check_dest(Path(dest_dir), force, out)
    tr = load_transformer(tdir)
    check_representable(tr)
    calibrate_fn = None
    if any(isinstance(m, W8A8Linear) for m in tr.modules()):
        ptq = [p for p in manifest["passes"] if p["name"] == "ptq"]
        n = ptq[-1]["config"].get("calib_samples", 16) if ptq else 16
        calibrate_fn = _calibration_from_run(manifest, model, cache_dir, n)
    to_quanto(tr, calibrate_fn)
    config = json.loads((tdir / CONFIG).read_text()) if (tdir / CONFIG).is_file() else None
    if config is not None:  # our output hides the class from stock diffusers; quanto's shows it
        config["_class_name"] = type(tr).__name__
    return save_quanto(tr, dest_dir, force=force, config=config, _source=out)


def load_quanto(dest_dir: str | Path) -> nn.Module:
    """Read an export back with quanto alone: an empty model from config.json + ``requantize``."""
    import diffusers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    q = _quanto()
    d = Path(dest_dir)
    config = json.loads((d / CONFIG).read_text())
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise UserError(f"{d}: config.json names no diffusers class this version knows")
    with init_empty_weights():
        model = cls.from_config(config)
    index = d / "diffusion_pytorch_model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.is_file() else ["diffusion_pytorch_model.safetensors"])
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(d / f)))
    q.requantize(model, sd, json.loads((d / QMAP).read_text()), device=torch.device("cpu"))
    return model.eval()
