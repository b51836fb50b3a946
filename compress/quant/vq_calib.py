"""Calibration of VQ codebooks and assignments (VQ4DiT-style) against reference outputs.

Each selected Linear of a block is replaced, while the block is calibrated, by a
:class:`SoftVQLinear`: every sub-vector keeps its ``n`` nearest codewords as candidates, and
learnable logits turn into ratios by softmax; the weight is the ratio-weighted sum of the
candidates. The block's output is fitted to a reference output (mean squared error) with
RMSprop on codebooks and logits, plus a regulariser ``sum r (1 - r)`` that pushes the ratios to
0 or 1; a sub-vector whose best ratio passes ``freeze_at`` is frozen to that candidate. After
calibration each layer is *hard*: one codeword per sub-vector, which is what VQLinear stores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from compress.quant.vq import group_of_rows


class SoftVQLinear(nn.Module):
    """A Linear whose weight is built from codebooks and (soft or hard) candidate choices."""

    def __init__(self, books: torch.Tensor, cand: torch.Tensor, dist: torch.Tensor,
                 bias: torch.Tensor | None, rows: int | None) -> None:
        super().__init__()
        out_f, nv, n = cand.shape
        _, k, d = books.shape
        self.in_features, self.out_features, self.dim, self.k = nv * d, out_f, d, k
        self.rows = rows
        self.books = nn.Parameter(books.detach().float().clone())
        self.register_buffer("flat", cand + (group_of_rows(out_f, rows) * k)[:, None, None])
        # initial ratios inversely proportional to each candidate's distance (as VQ4DiT):
        # logits log(1 / dist) up to a constant
        r = dist.clamp_min(0).sqrt() + 1e-5 * dist.sqrt().mean().clamp_min(1e-12)
        self.logits = nn.Parameter(-torch.log(r) if n > 1
                                   else torch.zeros(out_f, nv, 1))
        self.register_buffer("frozen", torch.zeros(out_f, nv, dtype=torch.bool))
        self.register_buffer("bias_", None if bias is None else bias.detach().float().clone())
        self.hard = False

    def ratios(self) -> torch.Tensor:
        r = torch.softmax(self.logits, dim=-1)
        if self.hard or bool(self.frozen.any()):
            one = F.one_hot(self.logits.argmax(-1), r.shape[-1]).to(r.dtype)
            mask = torch.ones_like(self.frozen) if self.hard else self.frozen
            r = torch.where(mask[..., None], one, r)
        return r

    def _best(self) -> torch.Tensor:
        """Row of the flat codebook table each sub-vector's best candidate points at."""
        return self.flat.gather(-1, self.logits.argmax(-1, keepdim=True))[..., 0]

    def choice(self) -> torch.Tensor:
        """Codeword index (within its codebook) of every sub-vector [out, in/d]."""
        return self._best() % self.k

    def weight(self) -> torch.Tensor:
        table = self.books.reshape(-1, self.dim)
        if self.hard:
            return table[self._best().reshape(-1)].view(self.out_features, self.in_features)
        cands = table[self.flat.reshape(-1)].view(*self.flat.shape, self.dim)
        w = (self.ratios()[..., None] * cands).sum(dim=-2)
        return w.reshape(self.out_features, self.in_features)

    def regulariser(self) -> torch.Tensor:
        if self.hard or self.flat.shape[-1] == 1:
            return self.logits.new_zeros(())
        r = torch.softmax(self.logits, dim=-1)
        live = (~self.frozen).to(r.dtype)[..., None]
        return (r * (1 - r) * live).sum() / max(1.0, float(live.sum()))

    @torch.no_grad()
    def freeze(self, threshold: float) -> None:
        r = torch.softmax(self.logits, dim=-1)
        self.frozen |= r.amax(dim=-1) >= threshold

    def frozen_fraction(self) -> float:
        return 1.0 if self.hard else float(self.frozen.float().mean())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight().to(x.dtype)
        b = None if self.bias_ is None else self.bias_.to(x.dtype)
        return F.linear(x, w, b)


def output_tensors(out) -> list[torch.Tensor]:
    """Floating tensors of a block's output (a tensor, or tuples/lists/dicts of them)."""
    from compress.models.trace import tensors_in

    return [t for t in tensors_in(out) if t.is_floating_point()]


def output_mse(out, ref: Sequence[torch.Tensor]) -> torch.Tensor:
    got = output_tensors(out)
    if len(got) != len(ref):
        raise RuntimeError(f"the block returned {len(got)} tensors, its reference {len(ref)}")
    # each output counted relative to its own scale, so a small side output is not drowned
    return sum(F.mse_loss(g.float(), r.float()) / (r.float().pow(2).mean() + 1e-12)
               for g, r in zip(got, ref))


def calibrate(layers: Sequence[SoftVQLinear], run: Callable[[int], object],
              refs: Sequence[Sequence[torch.Tensor]], iters: int, lr_books: float,
              lr_logits: float, reg: float, freeze_at: float, seed: int,
              progress: Callable[[int, float], None] | None = None) -> dict:
    """Fit the soft layers so that ``run(i)`` (the block on sample ``i``) matches ``refs[i]``.

    Returns {"loss_first", "loss_last", "frozen"}: the mean loss over the first and last tenth
    of the iterations and the fraction of sub-vectors frozen before the final hardening.
    """
    books = [m.books for m in layers]
    logits = [m.logits for m in layers if m.logits.shape[-1] > 1]
    opts = [torch.optim.RMSprop(books, lr=lr_books)]
    if logits:
        opts.append(torch.optim.RMSprop(logits, lr=lr_logits))
    g = torch.Generator().manual_seed(seed)
    n = len(refs)
    order: list[int] = []
    losses: list[float] = []
    tenth = max(1, iters // 10)
    for it in range(iters):
        if not order:
            order = torch.randperm(n, generator=g).tolist()
        i = order.pop()
        loss = output_mse(run(i), refs[i])
        total = loss + reg * sum(m.regulariser() for m in layers) if reg else loss
        for o in opts:
            o.zero_grad(set_to_none=True)
        total.backward()
        for o in opts:
            o.step()
        losses.append(float(loss.detach()))
        if (it + 1) % tenth == 0:
            for m in layers:
                m.freeze(freeze_at)
        if progress is not None:
            progress(it, losses[-1])
    frozen = (sum(m.frozen_fraction() * m.flat.shape[0] * m.flat.shape[1] for m in layers)
              / max(1, sum(m.flat.shape[0] * m.flat.shape[1] for m in layers)))
    for m in layers:
        m.hard = True
        with torch.no_grad():  # what is stored: fp16 codebooks
            m.books.copy_(m.books.half().float())
    first = sum(losses[:tenth]) / len(losses[:tenth]) if losses else math.nan
    last = sum(losses[-tenth:]) / len(losses[-tenth:]) if losses else math.nan
    return {"loss_first": first, "loss_last": last, "frozen": frozen}
