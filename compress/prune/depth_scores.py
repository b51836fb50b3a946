"""Which blocks matter: scores for depth pruning from the calibration samples.

A block's "stream" is each tensor it returns paired with the input tensor it updates (same
shape, the most similar one: DiT blocks are residual, so the output is closest to the input it
was added to). That pairing works for single-stream blocks (DiT, PixArt, Sana, a plain-PyTorch
block) and joint ones (SD3/Flux return the text and image streams) without knowing the family.

- influence (ShortGPT): 1 - cosine(input, output) per token, averaged over tokens and samples.
- skip_error: relative MSE of the transformer's output with the one block skipped.
- intervals (PPCL-style): each block gets a least-squares linear probe from its input stream to
  its output stream; an interval of consecutive blocks is scored by the output similarity of
  the model with the interval replaced by its probes; disjoint intervals that remove the wanted
  number of blocks at the least total loss of similarity are chosen by dynamic programming.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress.models.trace import tensors_in
from compress.train.kd import Taps


def pair_streams(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> list[int | None]:
    """For each output tensor, the index of the input tensor it updates (or None)."""
    pairs: list[int | None] = []
    for o in outputs:
        best, best_sim = None, -2.0
        for j, x in enumerate(inputs):
            if x.shape != o.shape or not x.is_floating_point():
                continue
            sim = float(F.cosine_similarity(x.flatten().float(), o.flatten().float(), dim=0))
            if sim > best_sim:
                best, best_sim = j, sim
        pairs.append(best)
    return pairs


def block_io(taps: Taps, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    args, kwargs = taps.inp[name]
    return [t for t in tensors_in((args, kwargs)) if t.is_floating_point()], taps.out[name]


def _token_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last (channel) dimension, one value per token."""
    return F.cosine_similarity(a.float().reshape(-1, a.shape[-1]),
                               b.float().reshape(-1, b.shape[-1]), dim=-1)


def influence(run: Callable[[int], None], taps: Taps, blocks: list[str], n: int
              ) -> tuple[dict[str, float], dict[str, list[int | None]]]:
    """ShortGPT's block influence per block and the stream pairing found on the first sample."""
    sums = dict.fromkeys(blocks, 0.0)
    counts = dict.fromkeys(blocks, 0)
    pairing: dict[str, list[int | None]] = {}
    for i in tqdm(range(n), desc="influence", leave=False):
        taps.clear()
        run(i)
        for b in blocks:
            ins, outs = block_io(taps, b)
            if b not in pairing:
                pairing[b] = pair_streams(ins, outs)
            for o, j in zip(outs, pairing[b]):
                if j is None or o.dim() < 2:
                    continue
                c = _token_cos(ins[j], o)
                sums[b] += float((1 - c).sum())
                counts[b] += c.numel()
    return {b: sums[b] / max(counts[b], 1) for b in blocks}, pairing


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).pow(2).mean() / ref.float().pow(2).mean().clamp_min(1e-12))


def skip_error(model_out: Callable[[int], torch.Tensor], refs: list[torch.Tensor],
               skipping: Callable[[list[str]], object], blocks: list[str]) -> dict[str, float]:
    """Relative output error with each block alone skipped (``skipping(names)`` is a context)."""
    scores = {}
    for b in tqdm(blocks, desc="skip error", leave=False):
        with skipping([b]):
            scores[b] = sum(relative_error(model_out(i), r) for i, r in enumerate(refs)) / len(refs)
    return scores


class Probe(nn.Module):
    """out = x @ W + b per paired stream tensor: a block replaced by its linear fit."""

    def __init__(self, weights: list[tuple[int, torch.Tensor, torch.Tensor] | None]) -> None:
        super().__init__()
        self.maps = weights  # per output tensor: (input index, W, b) or None (pass input 0)

    def apply(self, ins: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for m in self.maps:
            if m is None:
                out.append(None)
                continue
            j, w, b = m
            x = ins[j]
            out.append((x.float() @ w + b).to(x.dtype))
        return out


def fit_interval_probes(run: Callable[[int], None], taps: Taps, names: list[str],
                        pairing: dict[str, list[int | None]], n: int, max_len: int,
                        ridge: float = 1e-3) -> dict[tuple[int, int], Probe]:
    """Least-squares linear probe per interval [a, b] of consecutive blocks (at most ``max_len``
    long): from the streams entering block a to the streams leaving block b, over every token
    of every calibration sample. Blocks of one container share a class, so block b's pairing
    indexes block a's inputs too."""
    spans = interval_candidates(len(names), max_len)
    xtx: dict[tuple[int, int], torch.Tensor] = {}
    xty: dict[tuple[int, int, int], torch.Tensor] = {}
    for i in tqdm(range(n), desc="probes", leave=False):
        taps.clear()
        run(i)
        io = [block_io(taps, b) for b in names]
        grams: dict[tuple[int, int], torch.Tensor] = {}  # this sample's [x, 1] per (a, j)
        for a, b in spans:
            for k, j in enumerate(pairing[names[b]]):
                o = io[b][1][k]
                if j is None or o.dim() < 2 or io[a][0][j].shape != o.shape:
                    continue
                if (a, j) not in grams:
                    x = io[a][0][j].float().reshape(-1, o.shape[-1])
                    grams[(a, j)] = torch.cat([x, torch.ones(len(x), 1)], 1)
                    xtx[(a, j)] = xtx.get((a, j), 0) + grams[(a, j)].T @ grams[(a, j)]
                y = o.float().reshape(-1, o.shape[-1])
                xty[(a, b, k)] = xty.get((a, b, k), 0) + grams[(a, j)].T @ y
    probes = {}
    for a, b in spans:
        maps: list = []
        for k, j in enumerate(pairing[names[b]]):
            if (a, b, k) not in xty:
                maps.append(None)
                continue
            m = xtx[(a, j)]
            m = m + ridge * m.diagonal().mean() * torch.eye(len(m))
            sol = torch.linalg.solve(m, xty[(a, b, k)])
            maps.append((j, sol[:-1], sol[-1]))
        probes[(a, b)] = Probe(maps)
    return probes


def choose_intervals(scores: dict[tuple[int, int], float], n: int, remove: int,
                     allowed: Callable[[int], bool]) -> list[tuple[int, int]]:
    """Disjoint intervals [a, b] (block positions of one list) removing ``remove`` blocks in
    all (an interval of length L keeps one block, removes L - 1) at the least total cost
    ``scores[(a, b)]``; ``allowed(i)`` says whether position i may be removed."""
    inf = float("inf")
    # best[i][r]: least cost over positions >= i removing r blocks
    best = [[inf] * (remove + 1) for _ in range(n + 1)]
    pick: dict[tuple[int, int], tuple[int, int] | None] = {}
    for r in range(remove + 1):
        best[n][r] = 0.0 if r == 0 else inf
    for i in range(n - 1, -1, -1):
        for r in range(remove + 1):
            best[i][r], pick[(i, r)] = best[i + 1][r], None
            for b in range(i + 1, n):
                k = b - i  # blocks removed: i+1 .. b (position i kept as the interval's block)
                if k > r or (i, b) not in scores:
                    continue
                if not all(allowed(p) for p in range(i + 1, b + 1)):
                    break
                c = scores[(i, b)] + best[b + 1][r - k]
                if c < best[i][r]:
                    best[i][r], pick[(i, r)] = c, (i, b)
    if best[0][remove] == inf:
        return []
    out, i, r = [], 0, remove
    while i < n and r > 0:
        p = pick[(i, r)]
        if p is None:
            i += 1
            continue
        out.append(p)
        r -= p[1] - p[0]
        i = p[1] + 1
    return out


def interval_candidates(n: int, max_len: int) -> list[tuple[int, int]]:
    return [(a, b) for a, b in itertools.combinations(range(n), 2) if b - a + 1 <= max_len]


def map_float_tensors(obj, fn: Callable[[int, torch.Tensor], torch.Tensor]):
    """``obj`` (a block's output) with its k-th floating tensor replaced by ``fn(k, tensor)``,
    in the order :func:`tensors_in` lists them."""
    k = 0

    def go(o):
        nonlocal k
        if isinstance(o, torch.Tensor):
            if not o.is_floating_point():
                return o
            k += 1
            return fn(k - 1, o)
        if isinstance(o, tuple):
            return type(o)(*[go(x) for x in o]) if hasattr(o, "_fields") else tuple(go(x) for x in o)
        if isinstance(o, list):
            return [go(x) for x in o]
        if isinstance(o, dict):
            return type(o)({kk: go(v) for kk, v in o.items()}) if type(o) is dict else \
                _dict_like(o, {kk: go(v) for kk, v in o.items()})
        return o

    return go(obj)


def _dict_like(o, values: dict):
    try:
        return type(o)(**values)
    except TypeError:
        return values


def interval_hooks(root: nn.Module, names: list[str], a: int, b: int, probe: Probe,
                   pairing: dict[str, list[int | None]]) -> list:
    """Forward hooks replacing blocks a..b by one linear probe: block a returns the probe's
    output on its input, blocks a+1..b pass their input streams through."""
    def make(pos: int):
        def hook(_m, args, kwargs, out):
            ins = [t for t in tensors_in((args, kwargs)) if t.is_floating_point()]
            if pos == a:
                new = probe.apply(ins)
            else:
                new = [None if j is None else ins[j] for j in pairing[names[pos]]]
            return map_float_tensors(out, lambda k, t: t if k >= len(new) or new[k] is None
                                     else new[k])
        return hook
    return [root.get_submodule(names[p]).register_forward_hook(make(p), with_kwargs=True)
            for p in range(a, b + 1)]
