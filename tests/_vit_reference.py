"""Brute-force references for the model-family patch tests, written independently of atc.merge/atc.cluster.

ATC clusters come from scikit-learn, ToMe's matching from Python loops, attention from an explicit softmax with
``log(size)`` added over keys, merging from a loop over clusters.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering
from torch.utils._python_dispatch import TorchDispatchMode

#: (method, linkage) pairs the family tests run: ATC with every linkage, and ToMe
METHODS = [("atc", "single"), ("atc", "complete"), ("atc", "average"), ("tome", "average")]


def clusters(metric_row: torch.Tensor, method: str, r: int, prefix: int, linkage: str) -> list[list[int]]:
    """Clusters (lists of token indices) of one sample ``(T, C)``, ordered by their smallest token."""
    t = metric_row.shape[0]
    m = F.normalize(metric_row.double(), dim=-1)
    out = [[i] for i in range(prefix)]
    groups: dict[int, list[int]] = {}
    if method == "atc":
        d = (1 - m[prefix:] @ m[prefix:].T).clamp_min(0).numpy()
        np.fill_diagonal(d, 0)
        lab = AgglomerativeClustering(n_clusters=t - prefix - r, metric="precomputed", linkage=linkage).fit_predict(d)
        for i, label in enumerate(lab):
            groups.setdefault(int(label), []).append(i + prefix)
    else:  # ToMe: even positions are sources, odd positions destinations (prefix excluded); top-r sources merge
        src = [i for i in range(prefix, t) if i % 2 == 0]
        dst = [i for i in range(prefix, t) if i % 2 == 1]
        best = []
        for s in src:
            scores = [float(m[s] @ m[d]) for d in dst]
            j = int(np.argmax(scores))
            best.append((scores[j], s, dst[j]))
        best.sort(key=lambda e: -e[0])
        target = {s: d for _, s, d in best[:r]}
        for i in range(prefix, t):
            groups.setdefault(target.get(i, i), []).append(i)
    return sorted(out + list(groups.values()), key=min)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + log size) v`` with heads ``(B, H, T, D)``; returns ``(B, T, H * D)``."""
    logits = (q @ k.transpose(-2, -1)) * scale + size.log()[:, None, None, :, 0]
    out = logits.softmax(-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def merge_loop(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, method: str, r: int, prefix: int,
               linkage: str) -> tuple[torch.Tensor, torch.Tensor, list[list[list[int]]]]:
    """Size-weighted mean of every cluster, one sample and one cluster at a time.

    Returns ``(x (B, T-r, C), size (B, T-r, 1), clusters)``, rows in order of each cluster's smallest token
    (``clusters[b]`` the clusters of sample ``b``, same order): use :func:`in_patch_order` to compare with a
    patch whose output order is another one.
    """
    outs, sizes, all_clusters = [], [], []
    for b in range(x.shape[0]):
        rows, srows = [], []
        cls = clusters(metric[b], method, r, prefix, linkage)
        for cl in cls:
            w = size[b, cl]
            rows.append((x[b, cl] * w).sum(0) / w.sum())
            srows.append(w.sum(0))
        outs.append(torch.stack(rows))
        sizes.append(torch.stack(srows))
        all_clusters.append(cls)
    return torch.stack(outs), torch.stack(sizes), all_clusters


def in_patch_order(rows: torch.Tensor, cls: list[list[list[int]]], map_in: torch.Tensor,
                   map_out: torch.Tensor) -> torch.Tensor:
    """Reorder reference rows ``(B, K, C)`` (one per cluster of ``cls``) into the patched block's output slots.

    ``map_in``/``map_out (B, N)``: the patch's source maps (input token -> slot) before and after the block.
    Asserts that the patch formed the same clusters (every member of a reference cluster lands in one slot, and
    clusters land in distinct slots), so only the order of the slots is taken from the patch.
    """
    out = torch.empty_like(rows)
    for b, sample in enumerate(cls):
        slots = []
        for cl in sample:
            dest = {int(map_out[b][map_in[b] == i][0]) for i in cl}
            assert len(dest) == 1, f"reference cluster {cl} split over slots {dest}"
            slots.append(dest.pop())
        assert sorted(slots) == list(range(len(sample))), "clusters do not match the patch's slots"
        out[b, slots] = rows[b]
    return out


def capture(block: torch.nn.Module, state_of) -> tuple[dict, list]:
    """Forward hooks recording ``block``'s input/kwargs/output and the merge state (``state_of()``) before it."""
    rec: dict = {}

    def pre(_m, args, kwargs):
        state = state_of()
        rec["x"] = args[0].detach().clone()
        rec["size"] = None if state.size is None else state.size.clone()
        rec["token_map"] = None if state.token_map is None else state.token_map.clone()
        rec["kwargs"] = kwargs

    def post(_m, _a, out):
        state = state_of()
        rec["out"] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        rec["token_map_out"] = None if state.token_map is None else state.token_map.clone()

    return rec, [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]


def randomize(model: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    """Random init leaves biases, norms and layer scales trivial: perturb every parameter so each term matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


class OpLog(TorchDispatchMode):
    """The ATen operators a forward runs, in order (to compare a patched model's with the unpatched one's)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
