"""Vector quantisation maths: sub-vectors, weighted k-means, nearest and top-n codewords, and the
Hessian-aware (GPTVQ-style) column-order quantiser.

A weight [out, in] is cut into sub-vectors of ``d`` consecutive inputs of one output row, so row
``o`` holds ``in/d`` sub-vectors and sub-vector ``(o, j)`` covers columns ``j*d .. j*d+d-1``.
Each group of ``rows`` output rows (all rows by default) has its own codebook of ``k`` codewords
of length ``d``; a sub-vector is stored as the index of one codeword (``log2 k`` bits), so a
weight costs ``log2(k)/d`` bits plus the codebook's share.

Distances may be weighted per input column (``importance``: the diagonal of the layer's input
Hessian, E[x_j^2]): an error on a column that sees large inputs costs more at the output.
"""

from __future__ import annotations

import math

import torch

_CHUNK = 1 << 15  # sub-vectors per distance block: bounds the [chunk, k] distance matrix


def index_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def subvectors(w: torch.Tensor, d: int) -> torch.Tensor:
    """[out, in] -> [out, in/d, d] (a view when contiguous)."""
    out_f, in_f = w.shape
    if in_f % d:
        raise ValueError(f"input width {in_f} is not a multiple of the sub-vector length {d}")
    return w.reshape(out_f, in_f // d, d)


def column_weights(importance: torch.Tensor | None, in_f: int, d: int) -> torch.Tensor:
    """Per (column block, dim) weights [in/d, d] from a per-column importance (None: ones)."""
    if importance is None:
        return torch.ones(in_f // d, d)
    imp = importance.detach().float().clamp_min(0)
    # a column that never saw input still matters a little; keep weights positive and bounded
    floor = imp.mean() * 1e-3 + 1e-12
    return (imp + floor).reshape(in_f // d, d)


def weighted_distances(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """sum_k h[i,k] (x[i,k] - c[j,k])^2 for every vector i and codeword j: [n, k]."""
    hx = h * x
    return (hx * x).sum(-1, keepdim=True) + torch.cat([hx, h], 1) @ torch.cat([-2 * c, c * c], 1).T


def nearest(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, n: int = 1
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [N, n] of the ``n`` nearest codewords (weighted) and their distances [N, n]."""
    idx, dist = [], []
    rhs = torch.cat([-2 * c, c * c], 1).T
    for s in range(0, x.shape[0], _CHUNK):
        xs, hs = x[s:s + _CHUNK], h[s:s + _CHUNK]
        hx = hs * xs
        dd = torch.cat([hx, hs], 1) @ rhs  # the per-vector constant sum h x^2 is added below
        if n == 1:
            v, i = dd.min(dim=1, keepdim=True)
        else:
            v, i = torch.topk(dd, n, dim=1, largest=False, sorted=True)
        idx.append(i)
        dist.append((v + (hx * xs).sum(-1, keepdim=True)).clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def _plus_plus(x: torch.Tensor, h: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding under the weighted distance (the first centre drawn at random)."""
    n = x.shape[0]
    centres = [x[int(torch.randint(n, (1,), generator=g))]]
    best = weighted_distances(x, h, centres[0][None])[:, 0].clamp_min(0)
    for _ in range(1, k):
        total = float(best.sum())
        if total <= 0:  # fewer distinct points than codewords: repeat some
            j = int(torch.randint(n, (1,), generator=g))
        else:
            j = int(torch.multinomial(best / total, 1, generator=g))
        centres.append(x[j])
        best = torch.minimum(best, weighted_distances(x, h, x[j][None])[:, 0].clamp_min(0))
    return torch.stack(centres)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, h: torch.Tensor | None = None, iters: int = 100,
           seed: int = 0, max_points: int = 1 << 14, tol: float = 1e-3
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means (Lloyd) of vectors ``x`` [N, d]: codebook [k, d] and assignment [N].

    ``h`` [N, d] weights each coordinate of each vector (distance and centroid are per-coordinate
    weighted). k-means++ seeding; Lloyd runs on at most ``max_points`` vectors (an even random
    sample of larger sets), for ``iters`` iterations or until fewer than ``tol`` of the
    assignments change; then every vector is assigned. An emptied cluster is re-seeded at the
    vector currently served worst. Deterministic for a given ``seed``.
    """
    x = x.detach().float()
    h = torch.ones_like(x) if h is None else h.detach().float().expand_as(x).contiguous()
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    if n <= k:  # every vector its own codeword, the rest repeats
        c = x[torch.arange(k) % n].clone()
        return c, torch.arange(n)
    pick = torch.randperm(n, generator=g)[:max_points] if n > max_points else None
    xs, hs = (x, h) if pick is None else (x[pick], h[pick])
    c = _plus_plus(xs, hs, k, g)
    assign = None
    for _ in range(iters):
        new, dist = nearest(xs, hs, c)
        new, dist = new[:, 0], dist[:, 0]
        changed = 1.0 if assign is None else float((new != assign).float().mean())
        assign = new
        num = torch.zeros_like(c).index_add_(0, assign, hs * xs)
        den = torch.zeros_like(c).index_add_(0, assign, hs)
        filled = den > 0
        c = torch.where(filled, num / den.clamp_min(1e-30), c)
        empty = (~filled).all(dim=1).nonzero().flatten()
        if len(empty):
            worst = torch.topk(dist, len(empty)).indices
            c[empty] = xs[worst]
        elif changed < tol:
            break
    return c, nearest(x, h, c)[0][:, 0]


def row_groups(out_f: int, rows: int | None) -> int:
    """Number of codebooks of a layer with ``rows`` output rows per codebook (None: one)."""
    return 1 if rows is None or rows >= out_f else -(-out_f // rows)


def group_of_rows(out_f: int, rows: int | None) -> torch.Tensor:
    """Codebook id of every output row [out]."""
    if rows is None or rows >= out_f:
        return torch.zeros(out_f, dtype=torch.long)
    return torch.arange(out_f) // rows


@torch.no_grad()
def init_codebooks(w: torch.Tensor, d: int, k: int, rows: int | None,
                   importance: torch.Tensor | None, iters: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means codebooks [G, k, d] and indices [out, in/d] (long) of a weight [out, in]."""
    out_f, in_f = w.shape
    sv = subvectors(w.float(), d)
    hw = column_weights(importance, in_f, d)
    gid = group_of_rows(out_f, rows)
    books, idx = [], torch.empty(out_f, in_f // d, dtype=torch.long)
    for g in range(row_groups(out_f, rows)):
        sel = gid == g
        x = sv[sel].reshape(-1, d)
        h = hw.expand(int(sel.sum()), -1, -1).reshape(-1, d)
        c, a = kmeans(x, k, h, iters, seed + g)
        books.append(c)
        idx[sel] = a.view(-1, in_f // d)
    return torch.stack(books), idx


def decode(books: torch.Tensor, idx: torch.Tensor, rows: int | None) -> torch.Tensor:
    """Weight [out, in] from codebooks [G, k, d] and indices [out, in/d] (differentiable in books)."""
    out_f, nv = idx.shape
    g, k, d = books.shape
    flat = idx.long() + (group_of_rows(out_f, rows).to(idx.device) * k)[:, None]
    return books.reshape(g * k, d)[flat.reshape(-1)].view(out_f, nv * d)


@torch.no_grad()
def assign_nearest(w: torch.Tensor, books: torch.Tensor, rows: int | None,
                   importance: torch.Tensor | None, n: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` nearest codewords of every sub-vector: indices [out, in/d, n] and distances."""
    out_f, in_f = w.shape
    g, _, d = books.shape
    sv = subvectors(w.float(), d)
    hw = column_weights(importance, in_f, d)
    gid = group_of_rows(out_f, rows)
    idx = torch.empty(out_f, in_f // d, n, dtype=torch.long)
    dist = torch.empty(out_f, in_f // d, n)
    for gi in range(g):
        sel = gid == gi
        m = int(sel.sum())
        i, dd = nearest(sv[sel].reshape(-1, d), hw.expand(m, -1, -1).reshape(-1, d), books[gi], n)
        idx[sel] = i.view(m, -1, n)
        dist[sel] = dd.view(m, -1, n)
    return idx, dist


@torch.no_grad()
def gptvq(w: torch.Tensor, hessian: torch.Tensor, d: int, k: int, rows: int | None, iters: int,
          seed: int, damp: float = 0.01, block: int = 128
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian-aware VQ (GPTVQ-style): codebooks [G, k, d] and indices [out, in/d].

    Columns are quantised ``d`` at a time, in order; the error of each group of ``d`` columns,
    ``E = (W_S - Q_S) U_SS^-1`` with ``U`` the upper Cholesky factor of ``H^-1``, is fed forward
    to the columns not yet quantised (``W_R -= E U_SR``), so later columns absorb what earlier
    ones lost, as GPTQ does for scalars. Codebooks come from k-means weighted by ``1/U_jj^2``
    (the inverse of the error each column can push forward).
    """
    out_f, in_f = w.shape
    w = w.detach().float().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(in_f, dtype=h.dtype) * damp * torch.diagonal(h).mean()
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # not positive definite even damped: fall back to the diagonal
        u = torch.diag(1 / torch.sqrt(torch.diagonal(h)))
    u = u.float()
    imp = 1 / torch.diagonal(u).pow(2)
    books, _ = init_codebooks(w, d, k, rows, imp, iters, seed)
    gid = group_of_rows(out_f, rows)
    masks = [gid == gi for gi in range(books.shape[0])]
    table = books.reshape(-1, d)
    idx = torch.empty(out_f, in_f // d, dtype=torch.long)
    block = max(d, block - block % d)
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for j in range(0, b1 - b0, d):
            cols = slice(j, j + d)
            x = wb[:, cols]
            hx = imp[b0 + j:b0 + j + d].expand(out_f, -1)
            a = torch.empty(out_f, dtype=torch.long)
            for gi, sel in enumerate(masks):
                a[sel] = nearest(x[sel], hx[sel], books[gi])[0][:, 0]
            q = table[a + gid * k]
            idx[:, (b0 + j) // d] = a
            # E U_SS = W_S - Q_S with U_SS upper triangular  <=>  U_SS^T E^T = (W_S - Q_S)^T
            e = torch.linalg.solve_triangular(ub[cols, cols].T, (x - q).T, upper=False).T
            wb[:, j + d:] -= e @ ub[cols, j + d:]
            err[:, cols] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return books, idx
