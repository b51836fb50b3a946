"""The training loop shared by distillation, learnable pruning and other training passes.

It runs on accelerate's ``Accelerator``: one process by default, several under ``torchrun`` /
``accelerate launch`` (each process takes its share of every global batch and the gradients are
summed across processes before the step, so N processes train the same model as one process at
the same global batch). Every batch is a function of (seed, step), so a run resumed from a
checkpoint sees exactly the data the uninterrupted run would have seen.

Checkpoints are safetensors (parameters and AdamW state) plus a JSON file (step, loss history,
a fingerprint of what is trained), written atomically every ``checkpoint_every`` steps by the
main process, the last one at the end of training (the runner deletes them once the output is
written). ``resume=True`` continues from the newest one whose fingerprint matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from compress.errors import UserError

CKPT_TENSORS = "state.safetensors"
CKPT_INFO = "state.json"


@dataclass
class TrainSettings:
    """What one training run does (the training passes fill it from their configs)."""

    steps: int
    batch: int  # samples per optimiser step, over all processes
    lr: float
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # 0: no checkpoints
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    micro: int = 0  # samples per forward call (0: all of a process's share of the batch)
    ema: float = 0.0  # decay of an exponential moving average of the weights, which the run
    #                   ends with (0: none, the last step's weights)


@dataclass
class TrainResult:
    history: list[float] = field(default_factory=list)  # mean loss per step
    parts: dict[str, list[float]] = field(default_factory=dict)  # loss terms per step
    seconds: float = 0.0
    resumed_from: int | None = None
    processes: int = 1


def accelerator(device: str | torch.device = "cpu"):
    """accelerate's Accelerator for ``device`` (one per process; torchrun gives several)."""
    from accelerate import Accelerator

    return Accelerator(cpu=torch.device(device).type == "cpu")


def lr_at(step: int, s: TrainSettings) -> float:
    if s.warmup and step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(s.steps - s.warmup, 1)
    t = min(max(step - s.warmup, 0) / span, 1.0)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def batch_indices(n: int, step: int, s: TrainSettings) -> list[int]:
    """The global batch of ``step``: ``s.batch`` sample indices drawn from (seed, step) alone."""
    g = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
    return torch.randint(n, (s.batch,), generator=g).tolist()


def fingerprint(names: list[str], params: list[torch.Tensor], s: TrainSettings, tag: str) -> str:
    h = hashlib.sha256(tag.encode())
    for n, p in zip(names, params):
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
    # (ema only when on: checkpoints written before it existed still resume)
    h.update(json.dumps({k: v for k, v in vars(s).items()
                         if k != "checkpoint_every" and (k != "ema" or v)},
                        sort_keys=True).encode())
    return h.hexdigest()[:16]


def ema_decay(step: int, decay: float) -> float:
    """The average's decay after ``step`` updates: ramped up from 0.1 so that the first steps,
    far from where training ends, weigh little even though the average starts at them."""
    return min(decay, (1 + step) / (10 + step))


def _save(ckpt: Path, step: int, params, opt: torch.optim.Optimizer, res: TrainResult,
          fp: str, extra: dict[str, torch.Tensor]) -> None:
    tensors = {f"param.{i}": p.detach().contiguous().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{i}.{k}"] = v.detach().reshape(v.shape).contiguous().clone()
    tensors.update({f"extra.{k}": v.detach().contiguous().clone() for k, v in extra.items()})
    info = {"step": step, "fingerprint": fp, "history": res.history, "parts": res.parts,
            "seconds": res.seconds}
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=ckpt.parent))
    try:
        save_file(tensors, str(tmp / CKPT_TENSORS))
        (tmp / CKPT_INFO).write_text(json.dumps(info))
        old = ckpt.parent / f".old-{os.getpid()}"
        if ckpt.exists():
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load(ckpt: Path, params, opt: torch.optim.Optimizer, fp: str) -> tuple[dict, dict]:
    try:
        info = json.loads((ckpt / CKPT_INFO).read_text())
        tensors = load_file(str(ckpt / CKPT_TENSORS))
    except (OSError, ValueError) as exc:
        raise UserError(f"{ckpt}: unreadable training checkpoint ({exc}); delete it and run "
                        "without --resume") from None
    if info.get("fingerprint") != fp:
        raise UserError(f"{ckpt}: the checkpoint was written by a different training setup "
                        "(model, trained parameters or settings changed); run without --resume "
                        "to start over")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
            st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
            if st:
                opt.state[p] = {k: v.clone() for k, v in st.items()}
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return info, extra


def train(
    named_params: list[tuple[str, torch.nn.Parameter]],
    loss_fn: Callable[[list[int], int], tuple[torch.Tensor, dict[str, float]]],
    n_samples: int,
    s: TrainSettings,
    *,
    acc=None,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    desc: str = "train",
    tag: str = "",
    extra_state: tuple[Callable[[], dict[str, torch.Tensor]],
                       Callable[[dict[str, torch.Tensor]], None]] | None = None,
    on_step: Callable[[int], None] | None = None,
    lr_mult: dict[str, float] | None = None,
) -> TrainResult:
    """Minimise the mean loss over batches of calibration samples.

    Args:
        named_params: the trained parameters (names only identify them in checkpoints).
        loss_fn: ``loss_fn(sample_indices, step)``: the mean loss of those samples (a scalar
            tensor with a graph) and its parts as floats.
        n_samples: samples to draw batches from.
        s: steps, batch, learning rate and schedule, checkpoint interval.
        acc: the Accelerator (made here for the CPU when None).
        ckpt_dir: folder for checkpoints (None: none are written).
        resume: continue from the checkpoint in ``ckpt_dir`` if there is one.
        tag: mixed into the checkpoint fingerprint (e.g. which blocks were kept).
        extra_state: (get, set) of extra tensors kept in checkpoints (e.g. mask logits' RNG).
        on_step: called with the step index before each step (temperature schedules).
        lr_mult: per parameter name, a factor on the learning rate (default 1).
    """
    acc = acc or accelerator()
    world, rank = acc.num_processes, acc.process_index
    if s.batch % world:
        raise UserError(f"training batch {s.batch} does not split over {world} processes; "
                        f"make it a multiple of {world}")
    names = [n for n, _ in named_params]
    params = [p for _, p in named_params]
    fp = fingerprint(names, params, s, tag)
    mult = lr_mult or {}
    groups: dict[float, list] = {}
    for n, p in named_params:
        groups.setdefault(float(mult.get(n, 1.0)), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr_mult": m} for m, ps in groups.items()],
                            lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.999))
    res = TrainResult(processes=world)
    ckpt = ckpt_dir / "last" if ckpt_dir is not None else None
    start = 0
    ema_state: dict[str, torch.Tensor] = {}
    if resume and ckpt is not None and (ckpt / CKPT_INFO).is_file():
        info, extra = _load(ckpt, params, opt, fp)
        ema_state = {k: extra.pop(k) for k in [k for k in extra if k.startswith("ema.")]}
        start = int(info["step"])
        res.history, res.parts = list(info["history"]), dict(info["parts"])
        res.seconds, res.resumed_from = float(info.get("seconds", 0.0)), start
        if extra_state is not None:
            extra_state[1](extra)
    ema = [p.detach().float().clone() for p in params] if s.ema else []
    if ema and start:
        if not all(f"ema.{i}" in ema_state for i in range(len(params))):
            raise UserError(f"{ckpt}: the checkpoint holds no weight average; run without "
                            "--resume to start over")
        ema = [ema_state[f"ema.{i}"].to(p.device) for i, p in enumerate(params)]
    t0 = time.perf_counter() - res.seconds
    bar = tqdm(total=s.steps, initial=start, desc=desc, disable=not acc.is_main_process,
               dynamic_ncols=True)
    for step in range(start, s.steps):
        if on_step is not None:
            on_step(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s) * group["lr_mult"]
        local = batch_indices(n_samples, step, s)[rank::world]
        total = torch.zeros(1)
        parts: dict[str, float] = {}
        micro = s.micro or len(local)
        for c in range(0, len(local), micro):
            chunk = local[c:c + micro]
            loss, lp = loss_fn(chunk, step)
            (loss * (len(chunk) / s.batch)).backward()
            total += loss.detach().float().cpu() * len(chunk)
            for k, v in lp.items():
                parts[k] = parts.get(k, 0.0) + float(v) * len(chunk)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if world > 1:
            flat = torch.cat([g.reshape(-1).float() for g in grads] + [total,
                             torch.tensor([parts.get(k, 0.0) for k in sorted(parts)])])
            flat = acc.reduce(flat.to(acc.device), reduction="sum").cpu()
            off = 0
            for p, g in zip(params, grads):
                p.grad = flat[off:off + g.numel()].view_as(p).to(p.dtype)
                off += g.numel()
            total = flat[off:off + 1]
            parts = {k: float(flat[off + 1 + j]) for j, k in enumerate(sorted(parts))}
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            d = ema_decay(step, s.ema)
            with torch.no_grad():
                for e, p in zip(ema, params):
                    e.lerp_(p.detach().float(), 1 - d)
        mean = float(total) / s.batch
        res.history.append(mean)
        for k, v in parts.items():
            res.parts.setdefault(k, []).append(v / s.batch)
        bar.set_postfix_str(f"loss {mean:.3e}")
        bar.update(1)
        done = step + 1
        if ckpt is not None and s.checkpoint_every and (done % s.checkpoint_every == 0
                                                        or done == s.steps):
            # the last one too: a run that fails after training resumes without retraining
            res.seconds = time.perf_counter() - t0
            if acc.is_main_process:
                extra = extra_state[0]() if extra_state is not None else {}
                extra.update({f"ema.{i}": e for i, e in enumerate(ema)})
                _save(ckpt, done, params, opt, res, fp, extra)
            acc.wait_for_everyone()
    bar.close()
    if ema:  # the run ends with the average
        with torch.no_grad():
            for e, p in zip(ema, params):
                p.copy_(e.to(p.dtype))
    res.seconds = time.perf_counter() - t0
    return res


@contextlib.contextmanager
def autocast(device: str | torch.device, precision: str):
    """bf16 autocast when asked for (or 'auto' on a CUDA device that has bf16), else nothing."""
    dev = torch.device(device)
    use = precision == "bf16" or (precision == "auto" and dev.type == "cuda"
                                  and torch.cuda.is_bf16_supported())
    if use:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def checkpoint_root(cache: Path | None) -> Path:
    from compress.calib.capture import default_cache_root

    return (cache or default_cache_root()) / "train"


def summarize_history(history: list[float], points: int = 200) -> list[list[float]]:
    """[[step, loss], ...] with at most ``points`` rows (means over equal spans)."""
    n = len(history)
    if n == 0:
        return []
    k = max(1, math.ceil(n / points))
    return [[min(i + k, n), sum(history[i:i + k]) / len(history[i:i + k])] for i in range(0, n, k)]


def info_of(res: TrainResult, s: TrainSettings) -> dict[str, Any]:
    """The report entry of one training run."""
    return {"steps": s.steps, "batch": s.batch, "lr": s.lr, **({"ema": s.ema} if s.ema else {}),
            "processes": res.processes,
            "seconds": round(res.seconds, 3), "resumed_from_step": res.resumed_from,
            "loss_first": res.history[0] if res.history else None,
            "loss_last": (sum(res.history[-20:]) / len(res.history[-20:])
                          if res.history else None),
            "loss_curve": summarize_history(res.history)}
