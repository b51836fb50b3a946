"""Which hidden channels of a feed-forward go to the shared expert and to each routed expert,
and the router's starting weights.

Shared expert: the ``shared`` channels of highest importance (first-order Taylor: the expected
squared change of the model output when the channel is switched off; Dense2MoE's choice).
Routed experts, equal widths, from the remaining channels:

- ``taylor``: in order of importance, cut into consecutive groups (Dense2MoE's metric).
- ``kmeans``: balanced k-means on the channels' normalised input weight rows (MoEfication).
- ``coactivation``: balanced k-means on the channels' activation patterns over the calibration
  tokens, so channels that fire together share an expert (LLaMA-MoE's co-activation split).
- ``random``: a random partition (baseline).

Router initialisation: ``lstsq`` fits, by ridge regression on the calibration tokens, a linear
map from the FFN input to the size of each expert's contribution to the FFN output, so the
router starts by choosing the experts that matter most for each token; ``centroid`` uses the
mean of each expert's normalised input weight rows (the cluster centroids).
"""

from __future__ import annotations

import torch


def balanced_kmeans(feats: torch.Tensor, k: int, sizes: list[int], seed: int,
                    iters: int = 20) -> list[list[int]]:
    """Cluster the rows of ``feats`` [N, F] into k groups of exactly ``sizes`` members each
    (cosine distance; each round assigns greedily by distance under the capacities)."""
    n = feats.shape[0]
    x = torch.nn.functional.normalize(feats.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(n, generator=gen)[:k]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        dist = 1 - x @ cent.T  # [N, k]
        order = torch.argsort(dist.reshape(-1), stable=True)
        room = list(sizes)
        got = [-1] * n
        left = n
        for flat in order.tolist():
            i, c = divmod(flat, k)
            if got[i] >= 0 or room[c] == 0:
                continue
            got[i], room[c], left = c, room[c] - 1, left - 1
            if left == 0:
                break
        new = torch.tensor(got)
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            members = x[assign == c]
            if len(members):
                cent[c] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return [torch.nonzero(assign == c).flatten().tolist() for c in range(k)]


def widths(routed: int, experts: int) -> list[int]:
    """Equal expert widths over ``routed`` channels (the first ones one wider if uneven)."""
    base, extra = divmod(routed, experts)
    return [base + (e < extra) for e in range(experts)]


def assign(method: str, importance: torch.Tensor, in_rows: torch.Tensor,
           acts: torch.Tensor | None, shared: int, experts: int,
           seed: int) -> tuple[list[int], list[list[int]]]:
    """(shared channel indices, per-expert channel indices) over the H hidden channels.

    importance [H]; in_rows [H, F]: each channel's input weights (both halves of a gated
    layer, concatenated); acts [T, H]: hidden activations on calibration tokens."""
    h = importance.numel()
    gen = torch.Generator().manual_seed(seed)
    if method == "random":
        order = torch.randperm(h, generator=gen).tolist()
    else:
        order = torch.argsort(importance.double(), descending=True, stable=True).tolist()
    shared_idx, rest = sorted(order[:shared]), order[shared:]
    sizes = widths(len(rest), experts)
    if method in ("taylor", "random"):
        groups, a = [], 0
        for s in sizes:
            groups.append(sorted(rest[a:a + s]))
            a += s
        return shared_idx, groups
    if method == "kmeans":
        feats = in_rows[rest]
    elif method == "coactivation":
        if acts is None:
            raise ValueError("coactivation needs the hidden activations")
        feats = acts[:, rest].T.abs()  # [R, T]: when each channel fires, and how strongly
    else:
        raise ValueError(f"unknown split {method!r}")
    groups = balanced_kmeans(feats, experts, sizes, seed)
    return shared_idx, [sorted(rest[i] for i in g) for g in groups]


def contribution(acts: torch.Tensor, out_cols: torch.Tensor, groups: list[list[int]]
                 ) -> torch.Tensor:
    """[T, E]: the norm of each expert's contribution to the FFN output, per token.
    acts [T, H]; out_cols [D_out, H] (the output layer's columns of the hidden channels)."""
    return torch.stack([(acts[:, g].float() @ out_cols[:, g].float().T).norm(dim=1)
                        for g in groups], dim=1)


def router_lstsq(x: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of ``target`` [T, E] on ``x`` [T, D] (with a bias): (weight [E, D],
    bias [E]), scaled so the logits' spread across experts is about one per token."""
    xd = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    y = target.double()
    y = y - y.mean(1, keepdim=True)
    gram = xd.T @ xd
    lam = ridge * float(gram.diagonal().mean())
    sol = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xd.T @ y)
    pred = xd @ sol
    spread = float(pred.std(dim=1).mean())
    sol = sol / max(spread, 1e-12)
    return sol[:-1].T.float().contiguous(), sol[-1].float().contiguous()


def router_centroid(in_rows: torch.Tensor, groups: list[list[int]], dim: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's mean normalised input weight row (the first half of a gated layer)."""
    rows = torch.nn.functional.normalize(in_rows[:, :dim].float(), dim=1)
    w = torch.stack([rows[g].mean(0) for g in groups])
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12), torch.zeros(len(groups))
