"""Knowledge-distillation pieces: block taps, the student-to-teacher block map, masked feature
loss, gradient checkpointing of blocks, and low-rank adapters merged after training."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from compress.models.trace import tensors_in


class Taps:
    """Forward hooks that keep the output tensors (and optionally the inputs) of named blocks."""

    def __init__(self, root: nn.Module, names: list[str], inputs: list[str] = (),
                 detach: bool = False) -> None:
        self.out: dict[str, list[torch.Tensor]] = {}
        self.inp: dict[str, tuple[tuple, dict]] = {}
        self._h = []
        for n in names:
            self._h.append(root.get_submodule(n).register_forward_hook(self._out_hook(n, detach)))
        for n in inputs:
            self._h.append(root.get_submodule(n).register_forward_pre_hook(
                self._in_hook(n), with_kwargs=True))

    def _out_hook(self, name: str, detach: bool):
        def hook(_m, _a, out):
            ts = [t for t in tensors_in(out) if t.is_floating_point()]
            self.out[name] = [t.detach() for t in ts] if detach else ts
        return hook

    def _in_hook(self, name: str):
        def hook(_m, args, kwargs):
            self.inp[name] = (tuple(args), dict(kwargs))
        return hook

    def clear(self) -> None:
        self.out.clear()
        self.inp.clear()

    def remove(self) -> None:
        for h in self._h:
            h.remove()
        self._h.clear()


def containers(names: list[str]) -> dict[str, list[str]]:
    """Block names grouped by the container they sit in, in order."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(n.rpartition(".")[0], []).append(n)
    return out


def feature_targets(teacher_blocks: list[str], kept: list[str]) -> list[str]:
    """For each kept block (teacher names, in the student's order), the teacher block whose
    output the student's block should reproduce: the last teacher block before the next kept
    block of the same container, or the container's last block."""
    kept_set = set(kept)
    target: dict[str, str] = {}
    for blocks in containers(teacher_blocks).values():
        ks = [b for b in blocks if b in kept_set]
        for j, b in enumerate(ks):
            target[b] = blocks[blocks.index(ks[j + 1]) - 1] if j + 1 < len(ks) else blocks[-1]
    return [target[k] for k in kept]


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """Mean squared error relative to the teacher's mean square, ignoring the teacher's massive
    activations (entries further than ``sigma`` standard deviations from its mean), as
    TinyFusion's masked distillation does; ``sigma`` None keeps every entry."""
    t = teacher.float()
    s = student.float()
    scale = t.pow(2).mean().clamp_min(1e-12)
    if sigma is None:
        return (s - t).pow(2).mean() / scale
    keep = ((t - t.mean()).abs() <= sigma * t.std().clamp_min(1e-12)).float()
    return ((s - t).pow(2) * keep).sum() / keep.sum().clamp_min(1.0) / scale


def per_sample(a: torch.Tensor, b: torch.Tensor, sigma: float | None,
               sizes: list[int] | None) -> torch.Tensor:
    """:func:`masked_mse` of each stacked sample (rows ``sizes`` along dim 0), averaged, so that
    a loss does not depend on which samples share a forward call."""
    if not sizes or len(sizes) == 1 or a.dim() == 0 or a.shape[0] != sum(sizes):
        return masked_mse(a, b, sigma)
    return torch.stack([masked_mse(x, y, sigma) for x, y in
                        zip(a.split(sizes), b.split(sizes))]).mean()


def feature_loss(s_out: list[torch.Tensor], t_out: list[torch.Tensor],
                 sigma: float | None, sizes: list[int] | None = None) -> torch.Tensor:
    """Masked relative MSE summed over the tensors a block returns (same shapes paired)."""
    terms = [per_sample(a, b, sigma, sizes) for a, b in zip(s_out, t_out) if a.shape == b.shape]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def output_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(student.float(), teacher.float())


@contextlib.contextmanager
def checkpointed(blocks: list[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Run each block under activation checkpointing (recomputed in the backward pass)."""
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    patched = []
    for b in blocks:
        fwd = b.forward

        def run(*args, _f=fwd, **kwargs):
            if not torch.is_grad_enabled():
                return _f(*args, **kwargs)
            return checkpoint(_f, *args, use_reentrant=False, **kwargs)

        b.forward = run
        patched.append(b)
    try:
        yield
    finally:
        for b in patched:
            del b.forward  # the instance attribute; the class's forward is back


class LoRALinear(nn.Module):
    """A Linear with a trainable low-rank branch ``B @ A`` (scaled alpha / rank) beside it."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, seed: int) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        g = torch.Generator().manual_seed(seed)
        a = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        self.lora_a = nn.Parameter(a.to(base.weight.device, base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank,
                                               device=base.weight.device, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        return self.base


def add_lora(root: nn.Module, names: list[str], rank: int, alpha: float, seed: int
             ) -> list[tuple[str, nn.Parameter]]:
    """Wrap the named Linears with LoRA branches; returns the new trainable parameters."""
    from compress.modules.swap import set_submodule

    params = []
    for i, n in enumerate(names):
        lin = root.get_submodule(n)
        rank_n = max(1, min(rank, lin.in_features, lin.out_features))
        wrapped = LoRALinear(lin, rank_n, alpha * rank_n / rank, seed + i)
        set_submodule(root, n, wrapped)
        params += [(f"{n}.lora_a", wrapped.lora_a), (f"{n}.lora_b", wrapped.lora_b)]
    return params


def merge_lora(root: nn.Module) -> int:
    """Fold every LoRA branch into its Linear; returns how many were merged."""
    from compress.modules.swap import set_submodule

    names = [n for n, m in root.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        set_submodule(root, n, root.get_submodule(n).merged())
    return len(names)
