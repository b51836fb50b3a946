"""run_recipe: load -> calibrate -> passes -> evaluate -> save -> report."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from compress.errors import GateFailed, UserError
from compress.recipe import (
    Recipe,
    gate_optional,
    gate_passes,
    load_recipe,
    parse_gate,
    validate,
)
from compress.registry import get_pass

log = logging.getLogger("compress")

CALIB_DIR = Path(__file__).resolve().parents[1] / "calibration_data"


def _is_demo(handle) -> bool:
    return handle.source is not None and str(handle.source) == "demo"


def family_defaults(handle) -> dict[str, Any]:
    """steps / guidance / resolution used when the recipe leaves them unset."""
    if _is_demo(handle):
        from compress.demo import DEMO_DEFAULTS

        return {k: DEMO_DEFAULTS[k] for k in ("steps", "guidance", "resolution")}
    return {"steps": 8, "guidance": None, "resolution": None}


def resolve_prompts(spec: str, handle, kind: str, n: int, seed: int = 0) -> list[str]:
    from compress.calib.prompts import load_prompts

    if spec == "random":  # zero-data: no prompt file at all
        from compress.calib.prompts import random_prompts

        return random_prompts(handle.pipeline, n, seed)
    if spec == "auto":
        if _is_demo(handle):
            name = "demo_calibration.txt" if kind == "calibration" else "demo_eval.txt"
        else:
            name = "general_prompts.txt"
        path = CALIB_DIR / name
    else:
        path = Path(spec)
        if not path.exists() and (CALIB_DIR.parent / spec).exists():
            path = CALIB_DIR.parent / spec
    prompts = load_prompts(path)
    if kind == "eval" and spec == "auto" and not _is_demo(handle):
        prompts = prompts[::-1]  # keep general eval prompts apart from the calibration ones
    return prompts[:n]


def count_params(tr: nn.Module) -> int:
    """Weights the module represents: parameters plus the logical weights of packed layers."""
    total = sum(p.numel() for p in tr.parameters())
    for m in tr.modules():
        if isinstance(m, nn.Linear) or not hasattr(m, "in_features"):
            continue
        if isinstance(getattr(m, "weight", None), nn.Parameter):
            continue
        # a packed replacement layer: its weights live in buffers, count what it stands for
        total += m.in_features * m.out_features
        b = getattr(m, "bias", None)
        if isinstance(b, torch.Tensor) and not isinstance(b, nn.Parameter):
            total += b.numel()
    return total


def buffer_elements(tr: nn.Module) -> int:
    """Elements of the persistent buffers (stored in the state dict next to the weights)."""
    seen = {p.data_ptr() for p in tr.parameters()}
    total = 0
    for t in tr.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel()
    return total


def stored_bytes(tr: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in tr.state_dict().values():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _dense_w8a8(tr: nn.Module) -> dict:
    """W8A8 layers that ran their weights dequantised (too small for int8 to pay; see
    compress/modules/w8a8_dense.py), as decided during evaluation on this machine."""
    from compress.modules.w8a8 import W8A8Linear

    layers = [(n, m._dense) for n, m in tr.named_modules() if isinstance(m, W8A8Linear)]
    if not layers:
        return {}
    dense = sorted(n for n, d in layers if d)
    return {"w8a8_dense": {"layers": len(dense), "of": len(layers), "names": dense[:20]}}


def _weight_gemm(tr: nn.Module) -> dict:
    """Which GEMM the layers that keep a dequantised weight last ran, per dtype (as timed on
    this machine, compress/modules/weight_cache.py), read off the layers themselves: part of a
    speed gain may be the kernel, not the bits, and the report says so."""
    from compress.modules import weight_cache

    used = weight_cache.kept_kernels(tr)
    return {"kept_weight_gemm": used} if used else {}


def _attention(tr: nn.Module) -> dict:
    """Which attention form each shape of the evaluation ran (compress/modules/attention.py):
    like the kept-weight GEMM, a kernel choice the original could make too."""
    from compress.modules import attention

    rows = attention.choices(tr)
    return {"attention": rows} if rows else {}


def step_latency_ms(handle, calib, repeats: int) -> float | None:
    from compress.metrics.timing import latency_ms_per_step

    if calib is None or len(calib) == 0:
        return None
    s = calib.sample(0)

    def step() -> None:
        with torch.no_grad():  # not inference_mode: kernels may cache per-tensor state
            handle.adapter.call(handle.transformer, s.args, s.kwargs)

    return latency_ms_per_step(step, repeats=repeats, warmup=1)


def _gates(recipe: Recipe, report: dict) -> dict[str, dict]:
    values: dict[str, Any] = {}
    for section in ("quality", "size", "speed"):
        for k, v in (report.get(section) or {}).items():
            if isinstance(v, (int, float)) or v is None:
                values[k] = v
    q = report.get("quality") or {}
    if q.get("prompt_accuracy") is not None and q.get("teacher_prompt_accuracy") is not None:
        values["prompt_accuracy_drop"] = q["teacher_prompt_accuracy"] - q["prompt_accuracy"]
    sp = report.get("speed") or {}
    if sp.get("latency_ms_per_step") and sp.get("baseline_latency_ms_per_step"):
        values["speedup"] = sp["baseline_latency_ms_per_step"] / sp["latency_ms_per_step"]
    out = {}
    for name, expr in recipe.gates.items():
        op, thr = parse_gate(expr)
        val = values.get(name)
        if val is None and gate_optional(expr):
            out[name] = {"value": None, "threshold": f"{op} {thr:g}", "passed": None,
                         "measured": False, "optional": True}
            continue
        out[name] = {"value": val, "threshold": f"{op} {thr:g}", "passed": gate_passes(op, val, thr)}
    return out


def measurable(handle, recipe: Recipe, has_calib: bool, sample_fn=None,
               metric_fn=None) -> dict[str, str]:
    """Figures this run cannot produce -> why, decided before any work."""
    from compress.recipe import FIGURES

    why: dict[str, str] = {}
    ev = recipe.eval
    if handle.pipeline is None and ev.enabled and sample_fn is not None:
        if metric_fn is None:
            for f in ("prompt_accuracy", "teacher_prompt_accuracy", "prompt_accuracy_drop"):
                why[f] = "no metric_fn was given to judge your module's samples"
    elif not (ev.enabled and handle.pipeline is not None):
        reason = ("evaluation is disabled (eval.enabled: false)" if not ev.enabled else
                  "the module has no pipeline and no sample_fn was given to sample it")
        for f in FIGURES["quality"]:
            why[f] = reason
    else:
        prompts = resolve_prompts(ev.prompts, handle, "eval", ev.num_prompts)
        from compress.metrics.evaluate import _checkable

        if not _is_demo(handle):
            reason = "no prompt checker exists for this model (only the demo's captions are checkable)"
        elif not _checkable(prompts):
            reason = "the eval prompts are not captions of the demo grammar"
        else:
            reason = None
        if reason:
            for f in ("prompt_accuracy", "teacher_prompt_accuracy", "prompt_accuracy_drop"):
                why[f] = reason
    if not ev.latency or not has_calib:
        reason = ("latency is off (eval.latency: false)" if not ev.latency
                  else "no calibration input to time a step on")
        for f in ("latency_ms_per_step", "baseline_latency_ms_per_step", "speedup"):
            why[f] = reason
    return why


def _check_run_inputs(handle, recipe: Recipe) -> None:
    """What depends on the model's defaults and on files named by the recipe, before any work
    (and before the --out lock, so that a refusal writes nothing)."""
    if handle.pipeline is None:
        return
    defaults = family_defaults(handle)
    if recipe.calibration.capture_steps:
        steps = recipe.calibration.steps or defaults["steps"]
        late = [i for i in recipe.calibration.capture_steps if i >= steps]
        if late:
            raise UserError(f"calibration.capture_steps {late}: this run has {steps} steps "
                            f"(indices 0..{steps - 1}); lower them or set calibration.steps")
    from compress.calib.prompts import load_prompts

    sources = [recipe.calibration] + ([recipe.eval] if recipe.eval.enabled else [])
    for section in sources:
        if section.prompts not in ("auto", "random"):  # a missing, huge, binary or empty file: refused now
            load_prompts(section.prompts, section.num_prompts)


def check_format_overlap(handle, recipe: Recipe) -> None:
    """Several storage-format passes (vq then ptq, say) must select disjoint layers: a layer
    already quantised by one cannot be quantised again by the next. Refused before any work
    (for an nn.Module: right after the trace that gives the roles)."""
    from compress.targets import select

    owner: dict[str, str] = {}
    for i, (name, cfg) in enumerate(recipe.pass_specs()):
        if get_pass(name).kind != "format" or not hasattr(cfg, "include"):
            continue
        picked = select(handle.adapter, handle.transformer, cfg.include, cfg.exclude,
                        types=(nn.Linear, nn.Conv2d))
        both = [n for n, _, _ in picked if n in owner]
        if both:
            raise UserError(f"passes.{i} ({name}) selects {len(both)} layer(s) that "
                            f"{owner[both[0]]} already quantises (e.g. {both[0]}); give each "
                            "layer to one pass with include/exclude")
        owner.update({n: f"passes.{i} ({name})" for n, _, _ in picked})


def estimate_output_bytes(handle) -> int:
    """An upper bound on what --out will hold: every tensor of the pipeline (or the module) as
    loaded (the compressed transformer is smaller), plus the report's images (a few MB)."""
    parts = [handle.transformer]
    if handle.pipeline is not None:
        parts = [m for m in vars(handle.pipeline).values() if isinstance(m, torch.nn.Module)]
    tensors = {id(t): t.numel() * t.element_size() for m in parts
               for t in (*m.parameters(), *m.buffers())}
    return sum(tensors.values()) + (16 << 20)


def check_gates(handle, recipe: Recipe, has_calib: bool, sample_fn=None, metric_fn=None) -> None:
    """Refuse, before any work, a gate whose figure this run cannot produce (unless optional)."""
    missing = measurable(handle, recipe, has_calib, sample_fn, metric_fn)
    for name, expr in recipe.gates.items():
        if name in missing and not gate_optional(expr):
            raise UserError(
                f"gate '{name}': cannot be measured on this run: {missing[name]}; drop the gate "
                f"or mark it optional ('{expr} if measured')"
            )


# the --out lock run_recipe takes before any work, held until it returns or raises
_OUT_LOCKS: contextvars.ContextVar[contextlib.ExitStack] = contextvars.ContextVar("out_locks")


def _holds_out_lock(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            token = _OUT_LOCKS.set(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _OUT_LOCKS.reset(token)
    return wrapper


def capture_calibration(handle, cc, defaults: dict, cache, device: str, seeds_per_prompt: int = 1):
    """The recipe's calibration set of a pipeline: prompts resolved, family defaults filled.
    With ``seeds_per_prompt`` > 1 every prompt is sampled that many times, on its own seeds."""
    from compress.calib.capture import capture

    prompts = resolve_prompts(cc.prompts, handle, "calibration", cc.num_prompts, cc.seed)
    prompts = [p for p in prompts for _ in range(seeds_per_prompt)]
    return capture(
        handle, prompts,
        seeds=[cc.seed + i for i in range(len(prompts))],
        steps=cc.steps or defaults["steps"],
        guidance=cc.guidance if cc.guidance is not None else defaults["guidance"],
        resolution=cc.resolution or defaults["resolution"],
        capture_steps=cc.capture_steps, cache_dir=cache, device=device,
    )


def _distributed(device: str):
    """accelerate's process state when this run is one of several processes (torchrun,
    accelerate launch), else None (no process group is started for a single process)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=torch.device(device).type == "cpu")


def _frozen_copy(tr: nn.Module) -> nn.Module:
    import copy

    from compress.models.generic import share_structure

    teacher = copy.deepcopy(tr).eval().requires_grad_(False)
    share_structure(tr, teacher)
    return teacher


def _checkpoint_dir(handle, recipe: Recipe, cache: Path | None) -> Path:
    """Where training passes keep checkpoints: one folder per (model, recipe)."""
    import hashlib

    from compress.calib.capture import _model_hash
    from compress.train.loop import checkpoint_root

    key = hashlib.sha256(f"{_model_hash(handle)}:{recipe.hash()}".encode()).hexdigest()[:16]
    return checkpoint_root(cache) / f"{recipe.name[:40]}-{key}"


def _accepts_n(fn) -> bool:
    import inspect

    try:
        return "n" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def sized_calibrate_fn(handle, want: dict):
    """A user's ``calibrate_fn`` asked for a pass's own data count (``n = num_prompts x
    seeds_per_prompt`` of ``want``), or None when it takes no ``n`` (or there is none)."""
    fn = handle.calibrate_fn
    if fn is None or not _accepts_n(fn):
        return None
    n = int(want.get("num_prompts", 1)) * int(want.get("seeds_per_prompt", 1))
    return lambda m: fn(m, n=n)


def _pass_data(handle, recipe: Recipe, calib, defaults: dict, cache, device: str, dist
               ) -> dict[int, Any]:
    """Each pass's own data set (``PassDef.data``), captured from the original before any pass
    changes the model. A user's module gets its calibrate_fn's set, made larger when the
    callable takes a count ``n`` (``calibrate_fn(module, n=prompts x seeds_per_prompt)``)."""
    out: dict[int, Any] = {}
    for i, (name, cfg) in enumerate(recipe.pass_specs()):
        fn = get_pass(name).data
        want = fn(cfg) if fn is not None else None
        if want is None:
            continue
        if handle.pipeline is None:
            call = sized_calibrate_fn(handle, want)
            if call is not None:
                from compress.calib.capture import capture_generic

                out[i] = capture_generic(handle.transformer, call)
            continue
        cc = recipe.calibration.model_copy(update={
            "prompts": want.get("prompts", recipe.calibration.prompts),
            "num_prompts": want.get("num_prompts", recipe.calibration.num_prompts),
            "seed": want.get("seed", recipe.calibration.seed)})
        reps = int(want.get("seeds_per_prompt", 1))
        with dist.main_process_first() if dist else contextlib.nullcontext():
            out[i] = capture_calibration(handle, cc, defaults, cache, device, reps)
    return out


@_holds_out_lock
def run_recipe(
    recipe: Recipe | str | Path | dict,
    model: str | Path | nn.Module = "demo",
    out: str | Path | None = None,
    *,
    calibrate_fn=None,
    sample_fn=None,
    metric_fn=None,
    spec=None,
    inplace: bool = False,
    overrides: list[str] | None = None,
    device: str = "cpu",
    force: bool = False,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> dict:
    """Run a recipe on a model, write the output directory, return the report.

    Args:
        recipe: a Recipe, a path to a recipe YAML, or raw recipe data.
        model: "demo", a diffusers pipeline or transformer directory, or an nn.Module (then
            ``calibrate_fn(module)`` must run it on representative inputs).
        out: output directory (None: keep the result in memory only; the report is returned).
        calibrate_fn: for an nn.Module, the callable that feeds it calibration inputs; its
            first call is also traced once to find the blocks and each layer's role.
        sample_fn: for an nn.Module, your sampler: ``sample_fn(module, seeds)`` returns images
            (N, H, W, 3) or (N, 3, H, W) in [0, 1], or latents (any other shape, N first),
            tensor or array, one per seed, or ``(samples, conditions)``. The original and the
            compressed module are sampled on the same seeds (``eval.seed + i``,
            ``eval.num_prompts`` of them) for PSNR/SSIM (latents: PSNR over the original's
            value range), and mixed precision's ``image`` metric uses it too.
        metric_fn: ``metric_fn(samples, conditions)`` -> a score (e.g. a classifier's accuracy),
            reported as ``prompt_accuracy`` / ``teacher_prompt_accuracy`` (and so gated by
            ``prompt_accuracy_drop``).
        spec: a ``compress.ModelSpec`` naming blocks/roles of an nn.Module (overrides the
            recipe's ``model:`` and what is inferred).
        inplace: compress the given nn.Module itself; by default a deep copy is compressed and
            the module is left unchanged (which costs one more copy of its weights in memory).
        overrides: ``a.b.c=value`` strings applied to the recipe.
        device: torch device for calibration, passes and evaluation.
        force: replace a non-empty ``out``.
        cache_dir: root of the calibration and teacher-image caches (and of training
            checkpoints, under ``train/``).
        resume: training passes (distill, learnable pruning) continue from their last
            checkpoint of an interrupted run with the same recipe and model.
        lora: a LoRA made for the model (.safetensors or a PEFT adapter directory), fused into
            it at ``lora_scale`` before calibration: the output is compressed from (and
            compared against) the model with the LoRA.

    Returns:
        The report (the content of report.json). Raises GateFailed after writing the output
        when a gate fails.
    """
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    last = [t_start]

    def phase(name: str) -> None:  # wall time since the previous phase ended
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - last[0], 3)
        last[0] = now

    from compress.calib.capture import capture_generic
    from compress.io.manifest import build_manifest
    from compress.io.save import check_out_dir, write_output
    from compress.metrics.timing import cpu_model, peak_rss_mb
    from compress.models import load_model
    from compress.models.base import ModelHandle

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe, overrides)
    elif isinstance(recipe, dict):
        from compress.recipe import apply_overrides

        recipe = validate(apply_overrides(dict(recipe), overrides or [], "<recipe>"))
    elif overrides:
        from compress.recipe import apply_overrides

        recipe = validate(apply_overrides(recipe.resolved(), overrides, "<recipe>"))

    if isinstance(model, (str, Path)) and str(model) == "demo-dit":
        from compress.demo import shapedit_task as task

        model, inplace = task.load_shapedit(), True
        calibrate_fn = calibrate_fn or task.calibrate
        sample_fn = sample_fn or task.sample_fn
        metric_fn = metric_fn or task.metric_fn
    prepared: list[dict] = []
    if spec is not None:
        from compress.models.spec import ModelSpec

        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.model_validate(spec)
    else:
        spec = recipe.model
    if isinstance(model, nn.Module):
        import copy

        from compress.models.generic import ADAPTER as GENERIC

        if not inplace:
            model = copy.deepcopy(model)
        handle = ModelHandle(transformer=model, adapter=GENERIC, calibrate_fn=calibrate_fn,
                             sample_fn=sample_fn)
        prepare = getattr(GENERIC, "prepare", None)  # unfuse torch attention, register lists
        prepared = prepare(model) if prepare is not None else []
    else:
        if spec is not None:
            raise UserError("recipe key 'model' (blocks/roles) applies to your own nn.Module; "
                            f"the {Path(str(model)).name} pipeline's layout is known: remove it")
        handle = load_model(model, device=device)
    lora_info = None
    if lora is not None:  # a readable LoRA file, checked with the rest before any work
        from compress.lora.load import check_source

        check_source(lora)
    check_gates(handle, recipe, has_calib=handle.pipeline is not None or calibrate_fn is not None,
                sample_fn=sample_fn, metric_fn=metric_fn)
    for name, cfg in recipe.pass_specs():  # each pass's model-dependent rules, before any work
        if get_pass(name).check is not None:
            get_pass(name).check(handle, cfg)
    _check_run_inputs(handle, recipe)
    if handle.pipeline is not None:
        check_format_overlap(handle, recipe)
    dist = _distributed(device)
    if dist is not None and not dist.is_main_process:
        out = None  # only the main process of a distributed run writes (and locks) --out
    if out is not None:
        check_out_dir(Path(out), force, None if _is_demo(handle) else handle.source,
                      need=estimate_output_bytes(handle))
        from compress.io.lock import OutLock

        _OUT_LOCKS.get().enter_context(OutLock(Path(out)))  # a second run to the same --out is refused
        if handle.pipeline is not None and not _is_demo(handle) and handle.source is not None:
            from compress.io.files import walk

            for _ in walk(Path(handle.source)):  # loops and broken links refused before work
                pass
    if lora is not None:  # fused into the source: calibration sees what will run
        from compress.lora.load import fuse_source

        lora_info = fuse_source(handle, lora, lora_scale)
    torch.manual_seed(recipe.seed)
    tr = handle.transformer
    phase("load_and_checks")
    t_run = time.perf_counter()
    orig_params = count_params(tr)
    orig_bytes = stored_bytes(tr)
    # bits per weight divide stored bytes by stored elements: buffers (position tables) are
    # in both, else a model with large buffers stores "more bits than fp32"
    orig_elems = orig_params + buffer_elements(tr)
    defaults = family_defaults(handle) if handle.pipeline is not None else {}
    cache = Path(cache_dir) if cache_dir else None

    # calibration: the transformer's real inputs, captured once and cached
    calib = None
    cc = recipe.calibration
    if handle.pipeline is not None:
        with dist.main_process_first() if dist else contextlib.nullcontext():
            calib = capture_calibration(handle, cc, defaults, cache, device)
    elif calibrate_fn is not None:
        calib = capture_generic(tr, calibrate_fn)
    structure = None
    if handle.pipeline is None:
        from compress.models.generic import analyse_module

        if calib is not None and len(calib):
            s0 = calib.sample(0)
            structure = analyse_module(tr, s0.args, s0.kwargs, spec)
        else:
            structure = analyse_module(tr, spec=spec)
        check_format_overlap(handle, recipe)
    if any(get_pass(n).needs_calibration for n, _ in recipe.pass_specs()) and calib is None:
        raise UserError("this recipe's passes need calibration data: pass calibrate_fn= for an nn.Module")
    phase("calibration")

    ev = recipe.eval
    do_eval = ev.enabled and handle.pipeline is not None
    own_eval = ev.enabled and handle.pipeline is None and sample_fn is not None
    teacher = eval_prompts = eval_seeds = conditions = None
    gen_args: dict[str, Any] = {}
    if own_eval:  # the user's sampler on the original (still uncompressed) module
        eval_seeds = [ev.seed + i for i in range(ev.num_prompts)]
        from compress.metrics.own import own_samples

        teacher, conditions, sample_kind = own_samples(sample_fn, tr, eval_seeds)
    if do_eval:
        from compress.metrics.evaluate import teacher_images

        eval_prompts = resolve_prompts(ev.prompts, handle, "eval", ev.num_prompts)
        eval_seeds = [ev.seed + i for i in range(len(eval_prompts))]
        gen_args = {
            "steps": ev.steps or defaults["steps"],
            "guidance": ev.guidance if ev.guidance is not None else defaults["guidance"],
            "resolution": ev.resolution or defaults["resolution"],
        }
        teacher = teacher_images(handle, eval_prompts, eval_seeds, cache_dir=cache, **gen_args)
    phase("original_samples")
    base_latency = step_latency_ms(handle, calib, ev.latency_repeats) if ev.latency else None
    phase("latency")
    pass_data = _pass_data(handle, recipe, calib, defaults, cache, device, dist)
    phase("pass_data")
    if any(get_pass(n).needs_teacher for n, _ in recipe.pass_specs()):
        handle.teacher = _frozen_copy(tr)
    handle.run = {"device": device, "cache": cache, "resume": resume,
                  "checkpoints": (_checkpoint_dir(handle, recipe, cache)
                                  if handle.teacher is not None else None)}
    pass_entries, manifest_passes = [], []
    for i, (name, cfg) in enumerate(recipe.pass_specs()):
        defn = get_pass(name)
        log.info("pass %s", name)
        t0 = time.perf_counter()
        handle.run["pass_index"] = i
        result = defn.apply(handle, pass_data.get(i, calib), cfg)
        secs = time.perf_counter() - t0
        pass_entries.append({"name": name, "seconds": round(secs, 3), **result.report})
        manifest_passes.append({"name": name, "config": cfg.model_dump(mode="json"),
                                "meta": result.meta})
    handle.teacher = None
    tr = handle.transformer
    tr.eval()
    from compress.modules import attention

    attention.enable(tr)  # as compress.load_* do: the evaluation runs what the output will
    phase("passes")
    if dist is not None and not dist.is_main_process:
        # the other processes of a distributed run helped train; the main one evaluates and saves
        dist.wait_for_everyone()
        return {"schema": 1, "passes": pass_entries, "process_index": dist.process_index}

    quality: dict[str, Any] = {"psnr_vs_teacher": None, "ssim_vs_teacher": None,
                               "prompt_accuracy": None, "teacher_prompt_accuracy": None}
    student = None
    from compress.modules import mob, moe

    moe.collect(tr, True)  # MoE layers count tokens per expert over the evaluation run,
    mob.collect(tr, True)  # routed blocks the samples that ran them
    if do_eval:
        from compress.metrics.evaluate import quality as quality_of
        from compress.metrics.evaluate import sample_images

        student = sample_images(handle, eval_prompts, eval_seeds, **gen_args)
        quality.update(quality_of(teacher, student, eval_prompts, demo=_is_demo(handle)))
    if own_eval:
        from compress.metrics.own import judge, own_samples

        student, _, kind = own_samples(sample_fn, tr, eval_seeds)
        if kind != sample_kind:
            raise UserError(f"sample_fn returned {sample_kind} for the original module and "
                            f"{kind} for the compressed one")
        quality.update(judge(teacher, student, kind, metric_fn, conditions))
        eval_prompts = [str(c) for c in conditions] if conditions is not None else None
    if not do_eval and not own_eval and calib is not None and len(calib):
        step_latency_ms(handle, calib, 1)  # no evaluation run: count routing on calibration
    phase("evaluation")
    inactive, moe_load, mob_load = mob.inactive_params(tr), moe.load_report(tr), \
        mob.load_report(tr)
    moe.collect(tr, False)
    mob.collect(tr, False)
    latency = step_latency_ms(handle, calib, ev.latency_repeats) if ev.latency else None
    phase("latency")

    new_bytes = stored_bytes(tr)
    total_params = count_params(tr)
    report: dict[str, Any] = {
        "schema": 1,
        "recipe": recipe.resolved(),
        "recipe_hash": recipe.hash(),
        "model": {"path": str(handle.source) if handle.source else None,
                  "family": handle.family, "params": orig_params,
                  "class": type(tr).__name__, "original_bytes": orig_bytes,
                  "buffer_elements": orig_elems - orig_params,
                  **({"prepared": prepared} if prepared else {}),
                  **({"lora": lora_info} if lora_info else {}),
                  **({"structure": structure.to_dict()} if structure is not None else {})},
        "passes": pass_entries,
        "size": {"params_total": total_params,
                 "params_active": (None if inactive is None else total_params if not inactive
                                   else round(total_params - inactive, 1)),
                 "bytes": new_bytes, "bits_per_weight": new_bytes * 8 / orig_elems,
                 "compression_ratio": orig_bytes / max(new_bytes, 1)},
        "speed": {"latency_ms_per_step": latency, "baseline_latency_ms_per_step": base_latency,
                  **_dense_w8a8(tr), **_weight_gemm(tr), **_attention(tr),
                  "peak_rss_mb": peak_rss_mb(), "device": str(device), "cpu": cpu_model()},
        "quality": quality,
        **({"moe_load": moe_load} if moe_load else {}),
        **({"blocks_load": mob_load} if mob_load else {}),
        "timing": {"total_seconds": round(time.perf_counter() - t_run, 3),
                   "passes_seconds": round(sum(e["seconds"] for e in pass_entries), 3),
                   "wall_seconds": round(time.perf_counter() - t_start, 3),
                   "phases_seconds": dict(phases)},
        "eval": ({"prompts": eval_prompts, "seeds": eval_seeds, **gen_args}
                 if do_eval or own_eval else None),
    }
    report["gates"] = _gates(recipe, report)

    if out is not None:
        from compress.report import write_report

        # latents have no picture to show; their figures are in the report
        pics = (None, None) if quality.get("samples") == "latents" else (teacher, student)
        manifest = build_manifest(handle, recipe.resolved(), recipe.hash(), manifest_passes,
                                  prepared=prepared)
        write_output(
            Path(out), handle=handle, manifest=manifest,
            recipe_yaml=yaml.safe_dump(recipe.resolved(), sort_keys=False),
            write_extras=lambda d: write_report(d, report, *pics, eval_prompts),
            force=force,
        )
    report["_student_images"] = student
    if dist is not None:
        dist.wait_for_everyone()
    ckpts = handle.run.get("checkpoints")
    if ckpts is not None and Path(ckpts).is_dir():
        import shutil

        shutil.rmtree(ckpts, ignore_errors=True)  # the run is complete: nothing to resume
    failed = [k for k, g in report["gates"].items() if g["passed"] is False]
    if failed:
        raise GateFailed(
            "gate failed: " + ", ".join(
                f"{k} = {report['gates'][k]['value']} (needs {report['gates'][k]['threshold']})"
                for k in failed
            ),
            report,
        )
    return report
