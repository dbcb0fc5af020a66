"""ViT-Adapter (Chen et al., ICLR 2023) with token reduction inside the ViT blocks (ATC / ToMe).

Layout per interaction stage ``[start, end]`` (indexes ``[[0,2],[3,5],[6,8],[9,11]]``):

    unmerge to the full H/16 x W/16 grid -> injector (deformable attention to the spatial-prior features)
    -> re-merge with the current clustering -> ViT blocks (reducing at ``reduction_loc``)
    -> unmerge -> extractor (multi-scale features attend to the ViT tokens)

The clustering state is one composed :class:`atc.merge.Merge` from the full grid to the current tokens
(``Merge.then``), so unmerging is a single gather. Merging, unmerging and clustering all go through
:mod:`atc.merge`. The output is a 4-level pyramid (strides 4, 8, 16, 32) for an FPN: the adapter's multi-scale
features plus, by default (``vit_features="final"``, as the published ViT-Adapter and token-reduction adapters),
the final ViT tokens unmerged to the full grid and resized bilinearly ×4, ×2, ×1, ×0.5 to every level;
``vit_features="per_stage"`` adds each interaction stage's tokens to its own level instead (the later upstream
ViT-Adapter release).

Names: ``keep_rate`` is the fraction of the current tokens kept at each reduction location (SViT: per stage).
The published configs call it ``reduction_ratio`` (merging adapters: ``--cfg-options
model.backbone.reduction_ratio=0.25``) and ``keep_ratio`` (SViT); the backbones accept those keys, mapped to
``keep_rate`` in one place, :func:`resolve_keep_rate`. (Stable Diffusion's ``--reduction_ratio`` is another
quantity, the fraction *removed*; see :mod:`atc.patch.diffusion`.)
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atc.checkpoint import resize_pos_embed
from atc.cluster import LINKAGES
from atc.detection.ms_deform_attn import MSDeformAttn
from atc.merge import (LAYOUTS, MERGE_METHODS, Merge, identity_merge, max_removable, merge_by_method,
                       proportional_attention_bias, validate_keep_rate)

__all__ = ["ViTAdapter", "Block", "planned_token_counts", "vit_adapter_tiny", "vit_adapter_small",
           "load_vit_weights", "vit_state_dict_for_adapter", "resolve_keep_rate", "config_keep_rate",
           "PUBLISHED_KEEP_RATE_KEYS"]

#: How the ViT tokens join the output pyramid (see the module docstring).
VIT_FEATURES = ("final", "per_stage")

#: The published config keys meaning ``keep_rate`` (the fraction of tokens kept): ``reduction_ratio`` in the
#: token-merging adapter configs, ``keep_ratio`` in the SViT configs.
PUBLISHED_KEEP_RATE_KEYS = ("reduction_ratio", "keep_ratio")


def resolve_keep_rate(**given: float | None) -> float | None:
    """The one place the published keys of the keep rate (:data:`PUBLISHED_KEEP_RATE_KEYS`) become ``keep_rate``.

    ``given`` maps ``keep_rate`` and/or published keys to their values, ``None`` meaning not set (the published
    plain-adapter configs write ``reduction_ratio=None``). Returns the keep rate, or ``None`` when none is set.
    Raises ``ValueError`` naming the key when a value is outside ``(0, 1]``, or when two keys set different
    values (``--cfg-options model.backbone.keep_rate=0.5`` on a config with ``reduction_ratio=0.7`` must not
    silently pick one).
    """
    unknown = sorted(set(given) - {"keep_rate", *PUBLISHED_KEEP_RATE_KEYS})
    if unknown:
        raise TypeError(f"resolve_keep_rate got unknown keys {unknown}")
    values = {key: validate_keep_rate(value, f"{key} (the fraction of tokens kept)")
              for key, value in given.items() if value is not None}
    if len(set(values.values())) > 1:
        said = ", ".join(f"{key}={value:g}" for key, value in values.items())
        raise ValueError(f"{said} disagree: each sets the fraction of tokens kept (keep_rate; reduction_ratio and "
                         f"keep_ratio are its published config names), set only one")
    return next(iter(values.values()), None)


def config_keep_rate(backbone: Mapping[str, Any]) -> float | None:
    """The keep rate a backbone config dict sets, under ``keep_rate`` or a published key (see
    :func:`resolve_keep_rate`); for readers of a config (run descriptions) that do not build the backbone."""
    return resolve_keep_rate(**{key: backbone.get(key) for key in ("keep_rate", *PUBLISHED_KEEP_RATE_KEYS)})


def planned_token_counts(num_tokens: int, keep_rate: float, num_locations: int) -> list[int]:
    """Token count after each reduction location: ``keep_rate`` of the *current* tokens (at least 1)."""
    counts, t = [], num_tokens
    for _ in range(num_locations):
        t = max(1, int(t * keep_rate))
        counts.append(t)
    return counts


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """timm-style attention that also returns the keys averaged over heads (ATC/ToMe's metric)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x (B, T, C)``, ``attn_bias (B, 1, 1, T)`` (log sizes) -> ``(out (B, T, C), metric (B, T, C/heads))``."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        mask = attn_bias.to(q.dtype) if attn_bias is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, t, c)), k.mean(1)


class Block(nn.Module):
    """Pre-norm ViT block; with ``r > 0`` it merges after the attention residual, before the MLP (ToMe/ATC).

    ``forward(x (B, T, C), size (B, T, 1) | None, merge: Merge | None)`` returns the possibly reduced
    ``(x, size, merge)``; ``merge`` is the composed map from the full token grid to the current tokens.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.keep_rate: float | None = None  # set by ViTAdapter on reduction blocks
        self.method, self.linkage, self.proportional_attn, self.layout = "atc", "average", True, "published"

    def forward(self, x: Tensor, size: Tensor | None = None, merge: Merge | None = None
                ) -> tuple[Tensor, Tensor | None, Merge | None]:
        bias = proportional_attention_bias(size) if (size is not None and self.proportional_attn) else None
        out, metric = self.attn(self.norm1(x), bias)
        x = x + self.drop_path(out)
        if self.keep_rate is not None and merge is not None:
            t = x.shape[1]
            r = t - max(1, int(t * self.keep_rate))
            # ToMe's cap (half the tokens) is checked up front for keep < 0.5; an odd count at 0.5 keeps one more
            r = min(r, max_removable(self.method, t, 0))
            # ToMe without a class token: unmerged sources in score order with the published layout
            options = {"linkage": self.linkage} if self.method == "atc" else {"layout": self.layout}
            step = merge_by_method(self.method, metric.float(), r, protected_tokens=0, **options)
            x, size = step.merge_wavg(x, size)
            merge = merge.then(step)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, size, merge


# ------------------------------------------------------------------------------------------------ adapter parts
def _norm2d(kind: str, dim: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(dim)
    if kind == "gn":
        return nn.GroupNorm(next(g for g in (32, 16, 8, 4, 2, 1) if dim % g == 0), dim)
    raise ValueError(f"unknown norm {kind!r}: choose 'bn' or 'gn'")


class SpatialPriorModule(nn.Module):
    """Conv stem giving the spatial prior: ``c1`` at stride 4 (map) and ``c2..c4`` tokens at strides 8/16/32."""

    def __init__(self, inplanes: int, embed_dim: int, norm: str = "bn") -> None:
        super().__init__()

        def conv(i: int, o: int, s: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), _norm2d(norm, o), nn.ReLU(inplace=True)]

        self.stem = nn.Sequential(*conv(3, inplanes, 2), *conv(inplanes, inplanes, 1), *conv(inplanes, inplanes, 1),
                                  nn.MaxPool2d(3, 2, 1))
        self.conv2 = nn.Sequential(*conv(inplanes, 2 * inplanes, 2))
        self.conv3 = nn.Sequential(*conv(2 * inplanes, 4 * inplanes, 2))
        self.conv4 = nn.Sequential(*conv(4 * inplanes, 4 * inplanes, 2))
        self.fc1 = nn.Conv2d(inplanes, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * inplanes, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * inplanes, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * inplanes, embed_dim, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        tok = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731
        return self.fc1(c1), tok(self.fc2(c2)), tok(self.fc3(c3)), tok(self.fc4(c4))


def _reference_points(shapes: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
    """Pixel-centre reference points ``(1, sum(H*W), 1, 2)`` normalised to [0, 1] for each grid."""
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=device),
                                torch.linspace(0.5, w - 0.5, w, device=device), indexing="ij")
        refs.append(torch.stack([xs.reshape(-1) / w, ys.reshape(-1) / h], -1))
    return torch.cat(refs, 0)[None, :, None]


class ConvFFN(nn.Module):
    """MLP with a 3x3 depthwise conv over each of the three pyramid levels (ViT-Adapter's CFFN)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.dw = nn.Linear(dim, hidden), nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act, self.fc2 = nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
        x = self.fc1(x)
        b, _, c = x.shape
        parts = x.split([h * w for h, w in shapes], dim=1)
        x = torch.cat([self.dw(p.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
                       for p, (h, w) in zip(parts, shapes)], 1)
        return self.fc2(self.act(x))


class Injector(nn.Module):
    """ViT tokens (full grid) attend to the spatial-prior tokens; gated by a learnable ``gamma`` (init 0)."""

    def __init__(self, dim: int, heads: int, points: int, levels: int, ratio: float, init_values: float) -> None:
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, levels, heads, points, ratio)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor, ref: Tensor, feat: Tensor, shapes: Sequence[tuple[int, int]]) -> Tensor:
        return x + self.gamma * self.attn(self.query_norm(x), ref, self.feat_norm(feat), shapes)


class Extractor(nn.Module):
    """Multi-scale tokens attend to the (unmerged) ViT tokens, then a ConvFFN."""

    def __init__(self, dim: int, heads: int, points: int, ratio: float, cffn_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn(dim, 1, heads, points, ratio)
        self.ffn_norm, self.ffn = nn.LayerNorm(dim, eps=1e-6), ConvFFN(dim, int(dim * cffn_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, c: Tensor, ref: Tensor, x: Tensor, x_shape: tuple[int, int],
                c_shapes: Sequence[tuple[int, int]]) -> Tensor:
        c = c + self.attn(self.query_norm(c), ref, self.feat_norm(x), [x_shape])
        return c + self.drop_path(self.ffn(self.ffn_norm(c), c_shapes))


# ------------------------------------------------------------------------------------------------------ backbone
class ViTAdapter(nn.Module):
    """ViT-Adapter backbone with optional token reduction.

    Args:
        embed_dim, depth, num_heads, mlp_ratio, patch_size, pretrain_size: the plain ViT (DeiT-T: 192/12/3).
        conv_inplane, n_points, deform_num_heads, deform_ratio, cffn_ratio, init_values: adapter settings.
        interaction_indexes: ``[[start, end], ...]`` block ranges of the interaction stages.
        keep_rate: fraction of the current tokens kept at each of ``reduction_loc`` (``None`` = no
            reduction; ``1.0`` runs the reduction code path but keeps every token).
        method: the reduction method, a key of :data:`atc.merge.MERGE_METHODS` (``atc``, ``tome``, ...).
        linkage: the ATC linkage, a key of :data:`atc.cluster.LINKAGES` (``single|complete|average``). The
            published configs select ToMe with ``linkage='tome'``; that spelling is accepted and means
            ``method='tome'``.
        proportional_attn: add ``log(size)`` to the attention logits of merged tokens.
        layout: token order after a ToMe merge (:data:`atc.merge.LAYOUTS`): ``published`` (ToMe's layout, as the
            published adapter) or ``spatial``.
        vit_features: ``final`` (published: the final unmerged ViT tokens, resized, added to all four levels)
            or ``per_stage`` (each interaction stage's tokens added to its own level).
        norm: ``bn`` (as published; converted to SyncBN by the training engine under DDP on GPU) or ``gn``.
        use_extra_extractor: two more extractors after the last stage (ViT-Adapter's default).
        pretrained: optional local DeiT/timm ViT checkpoint loaded into the plain-ViT part (patch embedding,
            position embedding, blocks), as mmdet's ``init_cfg``/``pretrained`` would; nothing is downloaded.
        layer_scale, window_attn, window_size: accepted for config compatibility; only the published values
            (``False`` / all ``False`` / all ``None``) are supported.
        reduction_ratio: the published configs' name for ``keep_rate`` (a keep fraction, unlike Stable
            Diffusion's ``--reduction_ratio``); mapped by :func:`resolve_keep_rate`, which refuses both set to
            different values.
    Input ``(B, 3, H, W)`` with H, W divisible by 32; output ``[f1, f2, f3, f4]``, ``(B, embed_dim, H/s, W/s)``
    for strides 4, 8, 16, 32.
    """

    block_cls: type[nn.Module] = Block

    def __init__(self, *, embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 patch_size: int = 16, pretrain_size: int = 224, drop_path_rate: float = 0.1,
                 conv_inplane: int = 64, n_points: int = 4, deform_num_heads: int = 6, deform_ratio: float = 1.0,
                 cffn_ratio: float = 0.25, init_values: float = 0.0,
                 interaction_indexes: Sequence[Sequence[int]] = ((0, 2), (3, 5), (6, 8), (9, 11)),
                 keep_rate: float | None = None, method: str = "atc", linkage: str = "average",
                 reduction_loc: Sequence[int] = (3, 6, 9), proportional_attn: bool = True, norm: str = "bn",
                 layout: str = "published", vit_features: str = "final",
                 use_extra_extractor: bool = True, pretrained: str | None = None, layer_scale: bool = False,
                 window_attn: Sequence[bool] | None = None, window_size: Sequence[int | None] | None = None,
                 reduction_ratio: float | None = None, **unused: object) -> None:
        super().__init__()
        if unused:
            raise TypeError(f"ViTAdapter got unknown arguments {sorted(unused)}")
        # Keys of the published configs that only have one supported value here.
        if layer_scale:
            raise ValueError("layer_scale=True is not supported (the published DeiT-based configs use False)")
        if any(window_attn or []) or any(s is not None for s in (window_size or [])):
            raise ValueError("window attention is not supported: use window_attn=[False]*depth, "
                             "window_size=[None]*depth")
        if vit_features not in VIT_FEATURES:
            raise ValueError(f"unknown vit_features {vit_features!r}: choose one of {', '.join(VIT_FEATURES)}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
        if linkage == "tome":  # the published configs' spelling of method='tome'
            if method not in ("atc", "tome"):
                raise ValueError(f"linkage='tome' (the published spelling of method='tome') contradicts "
                                 f"method={method!r}: set method='tome' and an ATC linkage, or drop linkage")
            method, linkage = "tome", "average"
        if method not in MERGE_METHODS:
            raise ValueError(f"unknown method {method!r}: choose one of {', '.join(sorted(MERGE_METHODS))}")
        if linkage not in LINKAGES:
            raise ValueError(f"unknown linkage {linkage!r}: choose one of {', '.join(sorted(LINKAGES))} "
                             f"(or method='tome' for ToMe)")
        keep_rate = resolve_keep_rate(keep_rate=keep_rate, reduction_ratio=reduction_ratio)
        if keep_rate is not None and method == "tome" and keep_rate < 0.5:
            raise ValueError(f"ToMe (method='tome') can remove at most half the tokens per location, so keep "
                             f"fraction {keep_rate:g} < 0.5 is impossible: use an ATC linkage "
                             f"(single|complete|average) or keep_rate (reduction_ratio) >= 0.5")
        idx = [list(map(int, p)) for p in interaction_indexes]
        if idx[0][0] != 0 or idx[-1][1] != depth - 1 or any(a[1] + 1 != b[0] for a, b in zip(idx, idx[1:])):
            raise ValueError(f"interaction_indexes {idx} must tile blocks 0..{depth - 1} contiguously")
        if any(not 0 <= loc < depth for loc in reduction_loc):
            raise ValueError(f"reduction_loc {list(reduction_loc)} must be block indexes in [0, {depth})")
        self.embed_dim, self.patch_size, self.interaction_indexes = embed_dim, patch_size, idx
        self.keep_rate = keep_rate
        # the blocks merge (and forward tracks sizes and the composed Merge); SViT sets keep_rate without merging
        self.merges_tokens = keep_rate is not None
        self.method, self.linkage = method, linkage
        self.reduction_loc = tuple(int(i) for i in reduction_loc)
        self.vit_features = vit_features
        self.pretrain_grid = pretrain_size // patch_size
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pretrain_grid**2, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(self.block_cls(embed_dim, num_heads, mlp_ratio, dpr[i]) for i in range(depth))
        if keep_rate is not None:
            for loc in self.reduction_loc:
                blk = self.blocks[loc]
                blk.keep_rate = keep_rate
                blk.method = method
                blk.linkage = linkage
        for blk in self.blocks:
            blk.proportional_attn, blk.layout = proportional_attn, layout
        self.level_embed = nn.Parameter(torch.zeros(3, embed_dim))
        nn.init.normal_(self.level_embed)
        self.spm = SpatialPriorModule(conv_inplane, embed_dim, norm)
        self.injectors = nn.ModuleList(Injector(embed_dim, deform_num_heads, n_points, 3, deform_ratio, init_values)
                                       for _ in idx)
        self.extractors = nn.ModuleList(Extractor(embed_dim, deform_num_heads, n_points, deform_ratio, cffn_ratio,
                                                  drop_path_rate) for _ in idx)
        self.extra_extractors = nn.ModuleList(
            Extractor(embed_dim, deform_num_heads, n_points, deform_ratio, cffn_ratio, 0.0)
            for _ in range(2 if use_extra_extractor else 0))
        self.up = nn.ConvTranspose2d(embed_dim, embed_dim, 2, 2)
        self.norms = nn.ModuleList(_norm2d(norm, embed_dim) for _ in range(4))
        self.last_token_counts: list[int] = []  # tokens after each reduction location in the last forward
        if pretrained:
            load_vit_weights(self, pretrained)

    def _pos_embed(self, h: int, w: int) -> Tensor:
        g = self.pretrain_grid
        pos = self.pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def extra_loss(self) -> Tensor | None:
        """Auxiliary loss of the last forward (SViT's ratio loss); ``None`` for merging backbones."""
        return None

    def forward(self, img: Tensor) -> list[Tensor]:
        b, _, hh, ww = img.shape
        if hh % 32 or ww % 32:
            raise ValueError(f"ViTAdapter needs H and W divisible by 32, got {hh}x{ww}")
        h, w = hh // self.patch_size, ww // self.patch_size
        c_shapes = [(hh // 8, ww // 8), (hh // 16, ww // 16), (hh // 32, ww // 32)]
        ref_inj = _reference_points([(h, w)], img.device)
        ref_ext = _reference_points(c_shapes, img.device)

        c1, c2, c3, c4 = self.spm(img)
        c = torch.cat([c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]], 1)
        x = self.patch_embed(img).flatten(2).transpose(1, 2) + self._pos_embed(h, w)

        reduce = self.merges_tokens
        merge = identity_merge(b, h * w, img.device) if reduce else None
        size = x.new_ones(b, h * w, 1) if reduce else None
        tokens = x  # current (possibly merged) ViT tokens
        self.last_token_counts, outs = [], []
        for stage, (start, end) in enumerate(self.interaction_indexes):
            full = merge.unmerge(tokens) if reduce else tokens
            full = self.injectors[stage](full, ref_inj, c, c_shapes)
            # Every original token weighs 1, so the plain slot mean is the size-weighted mean of its members.
            tokens = merge.merge(full) if reduce else full
            for i in range(start, end + 1):
                tokens, size, merge = self.blocks[i](tokens, size, merge)
                if reduce and i in self.reduction_loc:
                    self.last_token_counts.append(tokens.shape[1])
            full = merge.unmerge(tokens) if reduce else tokens
            c = self.extractors[stage](c, ref_ext, full, (h, w), c_shapes)
            if stage == len(self.interaction_indexes) - 1:
                for extractor in self.extra_extractors:
                    c = extractor(c, ref_ext, full, (h, w), c_shapes)
            outs.append(full.transpose(1, 2).reshape(b, self.embed_dim, h, w))

        n2, n3 = c_shapes[0][0] * c_shapes[0][1], c_shapes[1][0] * c_shapes[1][1]
        c2, c3, c4 = c[:, :n2], c[:, n2:n2 + n3], c[:, n2 + n3:]
        c2 = c2.transpose(1, 2).reshape(b, -1, *c_shapes[0])
        c3 = c3.transpose(1, 2).reshape(b, -1, *c_shapes[1])
        c4 = c4.transpose(1, 2).reshape(b, -1, *c_shapes[2])
        c1 = self.up(c2) + c1
        x1, x2, x3, x4 = outs if self.vit_features == "per_stage" else [outs[-1]] * 4
        c1 = c1 + F.interpolate(x1, scale_factor=4, mode="bilinear", align_corners=False)
        c2 = c2 + F.interpolate(x2, scale_factor=2, mode="bilinear", align_corners=False)
        c3 = c3 + x3
        c4 = c4 + F.interpolate(x4, scale_factor=0.5, mode="bilinear", align_corners=False)
        return [norm(f) for norm, f in zip(self.norms, (c1, c2, c3, c4))]


def vit_state_dict_for_adapter(state: dict[str, Tensor], adapter: ViTAdapter, prefix: str = "") -> dict[str, Tensor]:
    """Map a plain timm/DeiT ViT state dict onto ``adapter``'s ViT part (keys get ``prefix``).

    ``patch_embed.proj`` becomes ``patch_embed``; the position embedding loses its class/distillation tokens and
    is resampled to the adapter's pretraining grid by :func:`atc.checkpoint.resize_pos_embed` (bicubic, without
    antialiasing, as DeiT's fine-tuning). Keys the adapter does not have (cls token, head, final norm) are
    dropped; returns only tensors whose shapes fit.
    """
    own = adapter.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = key.replace("patch_embed.proj.", "patch_embed.")
        if name not in own or not isinstance(value, Tensor):
            continue
        if name == "pos_embed" and value.shape != own[name].shape:
            # the adapter has no class/distillation tokens: whatever precedes the square grid is prefix
            num_prefix = value.shape[1] - math.isqrt(value.shape[1]) ** 2
            new_side = math.isqrt(own[name].shape[1])
            value = resize_pos_embed(value, (new_side, new_side), num_prefix, antialias=False)[:, num_prefix:]
        if value.shape == own[name].shape:
            out[prefix + name] = value
    return out


def load_vit_weights(adapter: ViTAdapter, path: str) -> int:
    """Load a local DeiT/timm ViT checkpoint (``model``/``state_dict`` entry or a bare state dict) into the ViT
    part of ``adapter``; returns the number of tensors loaded. Raises ``FileNotFoundError``/``ValueError``."""
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained ViT checkpoint '{path}' not found (only local files are used; put "
                                f"the DeiT weights there or set model.backbone.pretrained=None)")
    from atc.checkpoint import CheckpointError, read_checkpoint, state_dict_from_checkpoint

    try:
        state = state_dict_from_checkpoint(read_checkpoint(path, "pretrained ViT checkpoint"), source=path)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from exc
    fit = vit_state_dict_for_adapter(state, adapter) if isinstance(state, dict) else {}
    if not any(k.startswith("blocks.") for k in fit):
        raise ValueError(f"'{path}' holds no ViT weights that fit this backbone (embed_dim {adapter.embed_dim}, "
                         f"{len(adapter.blocks)} blocks)")
    adapter.load_state_dict(fit, strict=False)
    return len(fit)


def vit_adapter_tiny(**kw: object) -> ViTAdapter:
    """ViT-Adapter-T (DeiT-Tiny: 192 dims, 3 heads, 6 deformable heads)."""
    return ViTAdapter(**{"embed_dim": 192, "num_heads": 3, "deform_num_heads": 6, **kw})


def vit_adapter_small(**kw: object) -> ViTAdapter:
    """ViT-Adapter-S (DeiT-Small: 384 dims, 6 heads, 6 deformable heads)."""
    return ViTAdapter(**{"embed_dim": 384, "num_heads": 6, "deform_num_heads": 6, **kw})
