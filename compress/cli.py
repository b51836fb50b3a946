"""The dit-compress command: run, calibrate, eval, compare, inspect, verify, clean, export-quanto,
export-gguf."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from compress.errors import GateFailed, UserError

EPILOG = """exit codes: 0 ok, 1 a quality gate failed or an internal error, 2 bad input.
examples:
  dit-compress run recipes/w8.yaml --out ./demo-w8
  dit-compress run recipes/w4-g64.yaml --model ./my-pixart --out ./pixart-w4 --set eval.num_prompts=8
  dit-compress compare ./demo-w8 ./demo-w4 --plot pareto.png
"""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dit-compress", description="Post-training compression for Diffusion Transformers.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="log more, show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="demo",
                       help="diffusers pipeline or transformer dir, 'demo' (default) or "
                            "'demo-dit' (the plain-PyTorch ShapeDiT)")

    p = sub.add_parser("run", help="run a recipe on a model and write the compressed output")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    model_arg(p)
    p.add_argument("--out", required=True, help="output directory (must be empty or new)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. passes.0.ptq.weights.bits=6 (repeatable)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, mps; default cpu)")
    p.add_argument("--cache-dir", default=None, help="calibration/teacher cache root "
                   "(default $DIT_COMPRESS_CACHE or ~/.cache/dit-compress)")
    p.add_argument("--lora", default=None, metavar="FILE",
                   help="a LoRA (.safetensors, or a PEFT adapter directory) for the original "
                        "model, fused into it before calibration, so the output is compressed "
                        "from what will run")
    p.add_argument("--lora-scale", type=float, default=1.0, metavar="S",
                   help="the LoRA's strength when fused (default 1.0)")
    p.add_argument("--resume", action="store_true",
                   help="training passes (distill, learnable pruning) continue from the last "
                   "checkpoint of an interrupted run of the same recipe on the same model")

    p = sub.add_parser("calibrate", help="capture calibration inputs into the cache")
    model_arg(p)
    p.add_argument("--prompts", default="auto", help="prompt file (txt, jsonl, tsv, json, dataset)")
    p.add_argument("--num-prompts", type=int, default=8, help="prompts to capture (default 8)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default: the family's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the family's)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt (default 0)")
    p.add_argument("--cache-dir", default=None, help="calibration/teacher cache root "
                   "(default $DIT_COMPRESS_CACHE or ~/.cache/dit-compress)")
    p.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, mps; default cpu)")

    p = sub.add_parser("eval", help="compare a compressed output with its original model")
    p.add_argument("output", help="a directory written by `dit-compress run`")
    p.add_argument("--prompts", default="auto",
                   help="prompt file (default: held-out demo captions / general prompts)")
    p.add_argument("--num-prompts", type=int, default=16, help="prompts to compare (default 16)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first prompt (default 1000)")
    p.add_argument("--model", default=None, help="the original (default: the manifest's source)")
    p.add_argument("--cache-dir", default=None, help="calibration/teacher cache root "
                   "(default $DIT_COMPRESS_CACHE or ~/.cache/dit-compress)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")

    p = sub.add_parser("compare", help="one table across outputs, and a quality/bits plot")
    p.add_argument("outputs", nargs="+", help="output dirs or report.json files")
    p.add_argument("--out", default=None, help="write the table to this markdown file")
    p.add_argument("--plot", default="compare.png", help="PNG plot path (default compare.png)")

    p = sub.add_parser("inspect", help="family, blocks, parameters per role, Linear names")
    p.add_argument("model", nargs="?", default="demo",
                   help="pipeline or transformer folder, or demo (default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("verify", help="check every file of an output against its manifest "
                                      "(sizes and SHA-256)")
    p.add_argument("output", help="a directory written by `dit-compress run`")

    p = sub.add_parser("clean", help="list and remove what killed runs left behind")
    p.add_argument("outputs", nargs="*", help="--out folders of earlier runs (their temporary "
                                              "siblings and lock files are removed)")
    p.add_argument("--cache-dir", default=None,
                   help="cache root whose temporary capture folders to remove (default: "
                        "$DIT_COMPRESS_CACHE or ~/.cache/dit-compress)")
    p.add_argument("--min-age", type=float, default=60.0,
                   help="minutes a cache temp folder must be untouched to count as left over")
    p.add_argument("--dry-run", action="store_true", help="list only")

    p = sub.add_parser("export-quanto", help="write a ptq output in optimum-quanto's format")
    p.add_argument("output", help="a directory written by `dit-compress run`")
    p.add_argument("dest", help="directory to write (must be empty or new)")
    p.add_argument("--force", action="store_true", help="replace a non-empty DEST")
    p.add_argument("--model", default=None,
                   help="source model, for static activations (default: the manifest's)")
    p.add_argument("--cache-dir", default=None, help="calibration cache root")

    p = sub.add_parser("export-gguf", help="write a ptq output (or a plain model at one type) "
                       "as a GGUF file diffusers' from_single_file loads")
    p.add_argument("source", help="a `dit-compress run` output, or with --type any diffusers "
                   "model folder")
    p.add_argument("dest", help="the .gguf file to write")
    p.add_argument("--type", dest="qtype", default=None,
                   help="quantise every block Linear to this type: Q8_0, Q5_1, Q5_0, Q4_1, "
                   "Q4_0 or F16 (default: each ptq layer's own bits)")
    p.add_argument("--float", dest="floats", default="f32", choices=["f32", "f16"],
                   help="type of the tensors that stay unquantised (default f32)")
    p.add_argument("--layout", default="auto", choices=["auto", "original", "diffusers"],
                   help="tensor names and shapes: the original checkpoint's (SD3, FLUX: what "
                   "ComfyUI-GGUF and stable-diffusion.cpp read) or diffusers' own; auto: the "
                   "original where diffusers' from_single_file converts it back, else diffusers'")
    p.add_argument("--force", action="store_true", help="replace an existing DEST")
    return ap


def _cmd_run(a) -> int:
    from compress.report import summary_lines
    from compress.runner import run_recipe

    try:
        report = run_recipe(a.recipe, a.model, a.out, overrides=a.set, device=a.device,
                            force=a.force, cache_dir=a.cache_dir, resume=a.resume,
                            lora=a.lora, lora_scale=a.lora_scale)
    except GateFailed as exc:
        report = exc.args[1]
        print("\n".join(summary_lines(report)))
        print(f"wrote {a.out}")
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    if "process_index" in report:  # a helper process of a distributed run: the main one reports
        return 0
    print("\n".join(summary_lines(report)))
    print(f"wrote {a.out} (report: {Path(a.out) / 'report.html'})")
    return 0


def _cmd_calibrate(a) -> int:
    from compress.calib.capture import capture
    from compress.models import load_model
    from compress.runner import family_defaults, resolve_prompts

    handle = load_model(a.model, device=a.device)
    d = family_defaults(handle)
    prompts = resolve_prompts(a.prompts, handle, "calibration", a.num_prompts)
    cs = capture(handle, prompts, seeds=[a.seed + i for i in range(len(prompts))],
                 steps=a.steps or d["steps"],
                 guidance=a.guidance if a.guidance is not None else d["guidance"],
                 resolution=a.resolution or d["resolution"],
                 cache_dir=Path(a.cache_dir) if a.cache_dir else None, device=a.device)
    print(f"{len(cs)} transformer calls captured from {len(prompts)} prompts -> {cs.root}")
    return 0


def _cmd_eval(a) -> int:
    from compress.io.load import load_pipeline
    from compress.io.manifest import read_manifest
    from compress.metrics.evaluate import quality, sample_images, teacher_images
    from compress.models import load_model
    from compress.models.base import ModelHandle
    from compress.runner import _is_demo, family_defaults, resolve_prompts

    out = Path(a.output)
    manifest = read_manifest(out / "transformer")
    source = a.model or manifest["source"]["path"]
    if source is None:
        raise UserError(f"{out}: the manifest names no source model; pass --model")
    teacher_h = load_model(source)
    d = family_defaults(teacher_h)
    prompts = resolve_prompts(a.prompts, teacher_h, "eval", a.num_prompts)
    seeds = [a.seed + i for i in range(len(prompts))]
    cache = Path(a.cache_dir) if a.cache_dir else None
    t = teacher_images(teacher_h, prompts, seeds, cache_dir=cache, **d)
    pipe = load_pipeline(out)
    student_h = ModelHandle(transformer=pipe.transformer, adapter=teacher_h.adapter, pipeline=pipe,
                            source=teacher_h.source)
    s = sample_images(student_h, prompts, seeds, **d)
    q = quality(t, s, prompts, demo=_is_demo(teacher_h))
    for k, v in q.items():
        if not isinstance(v, dict):
            print(f"{k:28s} {v if v is None else round(v, 4)}")
    if a.json:
        from compress.report import to_jsonable

        Path(a.json).write_text(json.dumps(to_jsonable(q), indent=2, allow_nan=False))
    return 0


def _cmd_compare(a) -> int:
    from compress.report.compare import compare

    table = compare(a.outputs, out_md=a.out, plot=a.plot)
    print(table)
    if a.plot:
        print(f"plot: {a.plot}")
    return 0


def _cmd_inspect(a) -> int:
    from compress.models import load_model
    from compress.models.inspect import format_inspect, inspect_model

    if a.model == "demo-dit":
        import compress
        from compress.demo import shapedit_task as task

        m = task.load_shapedit()
        x = torch_inputs_for_shapedit()
        d = compress.inspect(m, x, text=False)
    else:
        d = inspect_model(load_model(a.model))
    print(json.dumps(d, indent=2) if a.json else format_inspect(d))
    return 0


def torch_inputs_for_shapedit():
    import torch

    return (torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), torch.tensor([0, 432]))


def _cmd_verify(a) -> int:
    import time

    from compress.io import integrity
    from compress.io.manifest import MANIFEST, read_manifest

    out = Path(a.output)
    tdir = out / "transformer" if (out / "model_index.json").is_file() else out
    if not (tdir / MANIFEST).is_file():
        raise UserError(f"{out}: no {MANIFEST}; not a dit-compress output")
    manifest = read_manifest(tdir)
    t0 = time.perf_counter()
    n = integrity.check(tdir, manifest, hashes=True, everything=True)
    secs = time.perf_counter() - t0
    print(f"ok: {len(manifest['files'])} files, {n / 1e6:.1f} MB match the manifest "
          f"({secs:.2f} s)")
    return 0


def _cmd_clean(a) -> int:
    import shutil

    from compress.calib.capture import default_cache_root
    from compress.io.lock import stale

    cache = Path(a.cache_dir) / "calib" if a.cache_dir else default_cache_root()
    found = stale([Path(o) for o in a.outputs], cache, a.min_age * 60)
    for p in found:
        print(("would remove " if a.dry_run else "removed ") + str(p))
        if not a.dry_run:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    if not found:
        print("nothing left over")
    return 0


def _cmd_export_quanto(a) -> int:
    from compress.io.quanto_export import export_quanto

    dest = export_quanto(a.output, a.dest, force=a.force, model=a.model, cache_dir=a.cache_dir)
    print(f"wrote {dest} (read it with optimum.quanto.requantize; see README)")
    return 0


def _cmd_export_gguf(a) -> int:
    from compress.io.gguf_export import export_gguf

    r = export_gguf(a.source, a.dest, qtype=a.qtype, floats=a.floats, force=a.force,
                    layout=a.layout)
    print(f"wrote {a.dest} ({r['bytes'] / 2**20:.2f} MB, {r['layout']} layout): "
          f"{len(r['carried'])} layers with their "
          f"codes carried over, {len(r['requantised'])} re-quantised, {len(r['float_layers'])} "
          "kept as floats (load with from_single_file + GGUFQuantizationConfig; see README)")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not a.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        import warnings

        warnings.filterwarnings("ignore")
        # diffusers imports bitsandbytes whenever it is installed, and bitsandbytes then warns
        # on every start that it cannot fetch its optional CPU kernels offline: not our news
        for noisy in ("bitsandbytes", "kernels"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return {"run": _cmd_run, "calibrate": _cmd_calibrate, "eval": _cmd_eval,
                "compare": _cmd_compare, "inspect": _cmd_inspect,
                "verify": _cmd_verify, "clean": _cmd_clean, "export-quanto": _cmd_export_quanto,
                "export-gguf": _cmd_export_gguf}[a.cmd](a)
    except UserError as exc:
        if a.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line, traceback with -v
        if a.verbose:
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (re-run with -v for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
