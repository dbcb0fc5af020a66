"""Brute-force references for token merging in diffusion models (independent of atc.patch.diffusion).

Clusters come from scikit-learn and matches from explicit loops; a reference model is a deep copy of the unpatched
model whose block operations are wrapped by a loop that, sample by sample, averages each group of image tokens,
runs the block's own sub-module (diffusers' code, Flux's rotary embedding included) on the merged tokens with
batch 1, and writes each group's output back to its members.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering
from torch import nn

Groups = list[list[list[int]]]  # per sample: lists of token indices

# Block class -> {option name: [(sub-module, its input is [text, image], takes Flux's rotary table)]}: the spec of
# which operations merge_attn / merge_crossattn / merge_mlp put on merged tokens.
BLOCK_OPS = {
    "BasicTransformerBlock": {"attn": [("attn1", False, False)], "crossattn": [("attn2", False, False)],
                              "mlp": [("ff", False, False)]},
    "JointTransformerBlock": {"attn": [("attn", False, False), ("attn2", False, False)],
                              "mlp": [("ff", False, False)]},
    "FluxTransformerBlock": {"attn": [("attn", False, True)], "mlp": [("ff", False, False)]},
    "FluxSingleTransformerBlock": {"attn": [("attn", True, True)], "mlp": [("proj_mlp", True, False)]},
}


def atc_groups_sklearn(x: torch.Tensor, r: int, linkage: str) -> Groups:
    """Per sample: clusters of ``x (B, N, C)`` into ``N - r`` groups, from scikit-learn on cosine distances."""
    groups = []
    if r == 0:
        return [[[i] for i in range(x.shape[1])] for _ in range(x.shape[0])]
    for sample in x.detach().double().cpu().numpy():
        unit = sample / np.linalg.norm(sample, axis=1, keepdims=True)
        dist = np.clip(1 - unit @ unit.T, 0, 2)
        np.fill_diagonal(dist, 0)
        labels = AgglomerativeClustering(n_clusters=len(sample) - r, metric="precomputed",
                                         linkage=linkage).fit_predict(dist)
        groups.append([np.flatnonzero(labels == k).tolist() for k in range(labels.max() + 1)])
    return groups


def tome_sd_groups(x: torch.Tensor, r: int, h: int, w: int, generator: torch.Generator | None = None,
                   sx: int = 2, sy: int = 2) -> Groups:
    """ToMe-SD with loops: one destination per full ``sy × sx`` cell (drawn as tomesd does, or top-left), every
    other token a source; the ``r`` sources with the highest cosine similarity to their best destination join it."""
    hsy, wsx = h // sy, w // sx
    if generator is None:
        offsets = [[0] * wsx for _ in range(hsy)]
    else:
        offsets = torch.randint(sx * sy, (hsy, wsx), generator=generator).tolist()
    dst = [(i * sy + offsets[i][j] // sx) * w + j * sx + offsets[i][j] % sx for i in range(hsy) for j in range(wsx)]
    src = [t for t in range(h * w) if t not in set(dst)]
    groups = []
    for sample in x.detach().double().cpu().numpy():
        unit = sample / np.linalg.norm(sample, axis=1, keepdims=True)
        best = []
        for s in src:
            sims = [float(unit[s] @ unit[d]) for d in dst]
            k = int(np.argmax(sims))
            best.append((sims[k], s, dst[k]))
        best.sort(key=lambda item: -item[0])
        members = {d: [d] for d in dst}
        alone = []
        for rank, (_, s, d) in enumerate(best):
            (members[d].append(s) if rank < r else alone.append([s]))
        groups.append(list(members.values()) + alone)
    return groups


def _per_sample(value, b: int, bsz: int):
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == bsz:
        return value[b : b + 1]
    return value


def _wrap(module: nn.Module, ctx: dict, text_prefix: bool, rotary: bool) -> None:
    original = module.forward

    def forward(*args, **kwargs):
        if args:
            x, args = args[0], args[1:]
        else:
            x = kwargs.pop("hidden_states")
        groups = ctx.get("groups")
        if groups is None:
            return original(x, *args, **kwargs)
        bsz, total, _ = x.shape
        t = ctx["text"] if text_prefix else 0
        n = total - t
        firsts, rests = [], []
        for b, gs in enumerate(groups):
            img = x[b, t:]
            merged = torch.cat([x[b, :t], torch.stack([img[g].mean(0) for g in gs])])[None]
            a = [_per_sample(v, b, bsz) for v in args]
            kw = {k: _per_sample(v, b, bsz) for k, v in kwargs.items()}
            if rotary and kw.get("image_rotary_emb") is not None:
                cos, sin = kw["image_rotary_emb"]
                txt = cos.shape[0] - n  # text rows first, never merged

                def reduce(table):
                    return torch.cat([table[:txt], torch.stack([table[txt:][g].mean(0) for g in gs])])

                kw["image_rotary_emb"] = (reduce(cos), reduce(sin))
            out = original(merged, *a, **kw)
            first = out[0] if isinstance(out, tuple) else out
            full = first.new_empty(1, total, first.shape[-1])
            full[0, :t] = first[0, :t]
            for k, g in enumerate(gs):
                full[0, t + torch.tensor(g)] = first[0, t + k]
            firsts.append(full)
            rests.append(out[1:] if isinstance(out, tuple) else ())
        first = torch.cat(firsts)
        if not rests[0]:
            return first
        return (first, *(torch.cat(parts) for parts in zip(*rests)))

    module.forward = forward


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """A diffusion transformer's blocks in execution order (Flux: two-stream, then one-stream blocks)."""
    blocks = list(model.transformer_blocks)
    return blocks + list(getattr(model, "single_transformer_blocks", []))


def reference_model(model: nn.Module, group_fn: Callable[[torch.Tensor, int], Groups], ratio: float,
                    options=("attn",), blocks=None, block_list: Callable = transformer_blocks,
                    merge_when: Callable[[int], bool] = lambda n: True,
                    plan_key: Callable[[int, int, int], object] | None = None) -> nn.Module:
    """A deep copy of the unpatched ``model`` whose blocks (``blocks``: indices, default all) merge with loops.

    ``group_fn(x, r)`` gives the groups of a block input ``x (B, N, C)`` with ``r = int(N * ratio)`` removed;
    ``merge_when(N)`` can leave blocks of some token counts alone (UNet resolutions). ``plan_key(i, N, k)`` (block
    ``i``, the ``k``-th merging block with ``N`` tokens in this forward) shares plans: the first block of a key in
    a forward pass computes the groups from its input, later blocks of the key take them as they are."""
    ref = copy.deepcopy(model)
    shared: dict = {}
    seen: dict = {}

    def reset(module, args, kwargs):
        shared.clear()
        seen.clear()

    ref.register_forward_pre_hook(reset, with_kwargs=True)
    for i, block in enumerate(block_list(ref)):
        if blocks is not None and i not in blocks:
            continue
        ctx: dict = {}

        def pre(module, args, kwargs, ctx=ctx, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            n = x.shape[1]
            r = int(n * ratio)
            groups = None
            if r and merge_when(n):
                k = seen.get(n, 0)
                seen[n] = k + 1
                key = plan_key(i, n, k) if plan_key else ("block", i)
                if key not in shared:
                    shared[key] = group_fn(x, r)
                groups = shared[key]
            ctx["groups"] = groups
            enc = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
            ctx["text"] = enc.shape[1] if isinstance(enc, torch.Tensor) else 0

        def post(module, args, output, ctx=ctx):
            ctx["groups"] = None

        block.register_forward_pre_hook(pre, with_kwargs=True)
        block.register_forward_hook(post)
        for option in options:
            for attr, text_prefix, rotary in BLOCK_OPS[type(block).__name__].get(option, []):
                module = getattr(block, attr, None)
                if module is not None:
                    _wrap(module, ctx, text_prefix, rotary)
    return ref


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """A UNet's transformer blocks in module order (the indices of the patch's ``blocks`` option)."""
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


def tiled_groups(x: torch.Tensor, r: int, h: int, w: int, tile_h: int, tile_w: int, linkage: str) -> Groups:
    """ATC within tiles, by hand: tiles from the top-left corner, ``r`` split in proportion to tile size (largest
    remainder, earlier tile first on equal remainders, every tile keeping a token), each tile clustered alone by
    scikit-learn."""
    tiles = [[row * w + col for row in range(r0, min(r0 + tile_h, h)) for col in range(c0, min(c0 + tile_w, w))]
             for r0 in range(0, h, tile_h) for c0 in range(0, w, tile_w)]
    shares = [r * len(t) / (h * w) for t in tiles]
    removals = [int(s) for s in shares]
    for i in sorted(range(len(tiles)), key=lambda i: (-(shares[i] - int(shares[i])), i)):
        if sum(removals) < r and removals[i] < len(tiles[i]) - 1:  # every tile keeps a token
            removals[i] += 1
    assert sum(removals) == r
    groups: Groups = [[] for _ in range(x.shape[0])]
    for t, rt in zip(tiles, removals):
        for b, sample_groups in enumerate(atc_groups_sklearn(x[:, t], rt, linkage)):
            groups[b] += [[t[j] for j in g] for g in sample_groups]
    return groups
