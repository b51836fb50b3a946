"""ShapeDiT: a small class-conditional diffusion transformer written in plain PyTorch.

This is the second shipped model (``--model demo-dit``). It stands for a user's own DiT: it
uses no diffusers class and none of diffusers' or the facebookresearch DiT's layer names, keeps
its blocks in an ``nn.Sequential`` below the top level, modulates its norms from the
conditioning vector (adaLN), predicts the DDPM noise (epsilon) and comes with its own sampler.
Nothing in it knows about dit-compress; the toolkit must find its structure by itself.

Pixels are the diffusion space: 32x32 RGB scaled to [-1, 1], cut into 4x4 patches (64 tokens).
A class is one caption of the demo grammar with one object (colour x shape x size x position,
432 classes, ordered as ``compress.demo.shapes.all_single_captions``); its conditioning vector
is the mean of four attribute embeddings, so attributes are shared between classes. Class
``NULL_CLASS`` is the unconditional one used for classifier-free guidance.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compress.demo.shapes import COLORS, POSITIONS, SHAPES, SIZES, all_single_captions

ATTRIBUTE_SIZES = (len(COLORS), len(SHAPES), len(SIZES), len(POSITIONS))
NUM_CLASSES = math.prod(ATTRIBUTE_SIZES)
NULL_CLASS = NUM_CLASSES
TRAIN_STEPS = 1000  # DDPM timesteps

DEFAULT_CONFIG = {"width": 128, "depth": 8, "heads": 2, "patch": 4, "image": 32, "mlp": 4}


def class_captions() -> list[str]:
    """Caption of every class id."""
    return all_single_captions()


def _attribute_codes() -> torch.Tensor:
    """[NUM_CLASSES + 1, 4] rows of the attribute table each class averages."""
    offsets = [0]
    for n in ATTRIBUTE_SIZES[:-1]:
        offsets.append(offsets[-1] + n)
    rows = []
    for k in range(NUM_CLASSES):
        digits, rest = [], k
        for n in reversed(ATTRIBUTE_SIZES):
            digits.append(rest % n)
            rest //= n
        digits.reverse()
        rows.append([o + d for o, d in zip(offsets, digits, strict=True)])
    null = sum(ATTRIBUTE_SIZES)
    rows.append([null] * 4)
    return torch.tensor(rows, dtype=torch.long)


def _sincos(n: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine table for an n x n grid, [n * n, dim]."""
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter) / quarter)
    pos = torch.arange(n, dtype=torch.float32)
    ang = pos[:, None] * freq[None, :]
    row = torch.cat([ang.sin(), ang.cos()], dim=1)  # [n, dim / 2]
    ys = row[:, None, :].expand(n, n, -1)
    xs = row[None, :, :].expand(n, n, -1)
    return torch.cat([ys, xs], dim=-1).reshape(n * n, dim)


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    ang = t.float()[:, None] * freq[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=1)


class Cell(nn.Module):
    """One transformer block: adaLN-modulated self-attention and MLP with gated residuals."""

    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.pre = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.lin_a = nn.Linear(width, 3 * width)
        self.lin_b = nn.Linear(width, width)
        self.post = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.lin_c = nn.Linear(width, mlp * width)
        self.lin_d = nn.Linear(mlp * width, width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, g1, b1, s2, g2, b2 = self.mod(c)[:, None, :].chunk(6, dim=-1)
        z = self.pre(h) * (1 + s1) + b1
        b, n, _ = z.shape
        qkv = self.lin_a(z)
        inner = qkv.shape[-1] // 3  # the width, or less once heads are pruned
        q, k, v = qkv.view(b, n, 3, self.heads, inner // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        h = h + g1 * self.lin_b(a.transpose(1, 2).reshape(b, n, inner))
        z = self.post(h) * (1 + s2) + b2
        return h + g2 * self.lin_d(F.gelu(self.lin_c(z), approximate="tanh"))


class Core(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.cells = nn.Sequential(*[Cell(width, heads, mlp) for _ in range(depth)])

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for cell in self.cells:
            h = cell(h, c)
        return h


class Tail(nn.Module):
    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mod = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, out)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s, b = self.mod(c)[:, None, :].chunk(2, dim=-1)
        return self.out(self.norm(h) * (1 + s) + b)


class ShapeDiT(nn.Module):
    """Class-conditional DiT on 32x32 pixels: ``forward(x, t, y)`` predicts the noise in x.

    Args (``forward``):
        x: noisy images [B, 3, 32, 32] in the [-1, 1] scale.
        t: DDPM timesteps [B] in [0, 1000).
        y: class ids [B] (``NULL_CLASS`` for unconditional).
    """

    def __init__(self, width: int = 128, depth: int = 8, heads: int = 2, patch: int = 4,
                 image: int = 32, mlp: int = 4) -> None:
        super().__init__()
        self.config = {"width": width, "depth": depth, "heads": heads, "patch": patch,
                       "image": image, "mlp": mlp}
        self.patch, self.grid = patch, image // patch
        self.tokenize = nn.Conv2d(3, width, patch, patch)
        self.register_buffer("where", _sincos(self.grid, width), persistent=False)
        self.register_buffer("codes", _attribute_codes(), persistent=False)
        self.clock = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.attrs = nn.Embedding(sum(ATTRIBUTE_SIZES) + 1, width)
        self.core = Core(width, depth, heads, mlp)
        self.tail = Tail(width, patch * patch * 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.tokenize(x).flatten(2).transpose(1, 2) + self.where
        # features in fp32, then the model's dtype: the model also runs cast to bf16/fp16
        c = self.clock(timestep_features(t, 64).to(h.dtype)) + self.attrs(self.codes[y]).mean(dim=1)
        h = self.tail(self.core(h, c), c)
        b, p, g = x.shape[0], self.patch, self.grid
        h = h.view(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, 3, g * p, g * p)


# ------------------------------------------------------------------------------ diffusion


def alpha_bars(steps: int = TRAIN_STEPS) -> torch.Tensor:
    """Cosine noise schedule (Nichol & Dhariwal): cumulative signal fraction per timestep."""
    s = 0.008
    u = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    ab = (f[1:] / f[0]).clamp(1e-5, 1.0)
    return ab.float()


def class_of_seed(seed: int) -> int:
    """The class a sample seed draws (the sampler's own rule: seeds pick classes)."""
    return random.Random(int(seed) * 7919 + 17).randrange(NUM_CLASSES)


@torch.no_grad()
def sample(model: nn.Module, labels: Sequence[int], seeds: Sequence[int], steps: int = 25,
           guidance: float = 3.0) -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance; images [N, 3, 32, 32] in [0, 1].

    Each image's starting noise comes from its own seed, so an image does not depend on what
    else is in the batch (up to the last bits of batched matmuls).
    """
    n = len(labels)
    image = model.config["image"] if hasattr(model, "config") else 32
    x = torch.stack([torch.randn(3, image, image, generator=torch.Generator().manual_seed(int(s)))
                     for s in seeds])
    y = torch.tensor(list(labels), dtype=torch.long)
    y2 = torch.cat([torch.full_like(y, NULL_CLASS), y])
    ab = alpha_bars()
    ts = torch.linspace(TRAIN_STEPS - 1, 0, steps).round().long()
    for i, t in enumerate(ts):
        eps_u, eps_c = model(torch.cat([x, x]), torch.full((2 * n,), int(t)), y2).float().chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        a_t = ab[t]
        a_prev = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return ((x.clamp(-1, 1) + 1) / 2).float()


def sample_seeds(model: nn.Module, seeds: Sequence[int], steps: int = 25,
                 guidance: float = 3.0) -> tuple[torch.Tensor, list[str]]:
    """Images for seeds (each seed picks its class) and the caption of each image's class."""
    labels = [class_of_seed(s) for s in seeds]
    caps = class_captions()
    return sample(model, labels, seeds, steps, guidance), [caps[k] for k in labels]
