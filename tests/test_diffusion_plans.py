"""Faster merging in diffusion: plans shared by a group of blocks (plan="group"), reused across denoising steps
(reuse_steps) and ATC within tiles (tile) — against brute-force references, counted clustering calls and the
default behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import atc.merge  # noqa: E402
import atc.patch  # noqa: E402
from atc.cluster import agglomerative_clustering, canonical_labels  # noqa: E402
from atc.merge import grid_tiles, split_removals, tiled_atc_merge  # noqa: E402
from atc.patch.diffusion import merge_info, reseed  # noqa: E402
from atc.sd.denoisers import build_denoiser, random_inputs  # noqa: E402
from atc.sd.tiny_pipeline import build_tiny_pipeline  # noqa: E402

from _diffusion_reference import (atc_groups_sklearn, reference_model, tiled_groups, tome_sd_groups,  # noqa: E402
                                  unet_blocks)

UNET_LATENT = 16  # tiny UNet: 256 tokens at full resolution, 64 at half


def _unet():
    return build_denoiser("unet-tiny", perturb=0.05, block_out_channels=(16, 32), norm_num_groups=8,
                          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


@torch.no_grad()
def _run(model, inputs):
    return model(**inputs).sample


class ClusteringCalls:
    """Counts the clustering calls of ATC (every plan computation goes through atc.merge's clustering)."""

    def __init__(self, monkeypatch):
        self.calls = 0

        def counted(*args, **kwargs):
            self.calls += 1
            return agglomerative_clustering(*args, **kwargs)

        monkeypatch.setattr(atc.merge, "agglomerative_clustering", counted)


# ---------------------------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["unet", "pixart-tiny"])
def test_defaults_plan_every_block_at_every_step(name, monkeypatch):
    """plan="block", reuse_steps=1, no tiles: each merging block clusters its own input in every forward, as
    before these options existed (the brute-force tests of each family check the values)."""
    model = _unet() if name == "unet" else build_denoiser(name, perturb=0.05)
    grid = (UNET_LATENT, UNET_LATENT) if name == "unet" else (4, 6)
    counter = ClusteringCalls(monkeypatch)
    atc.patch.diffusers(model, method="atc", ratio=0.5, max_downsample=2)
    outs = [_run(model, random_inputs(model, grid, text_tokens=5, timestep=t)) for t in (900, 500, 500)]
    merging = len(merge_info(model)["tokens"])
    assert merging >= 3 and counter.calls == 3 * merging and merge_info(model)["plans"] == 3 * merging
    explicit = atc.patch.diffusers(model, method="atc", ratio=0.5, max_downsample=2, plan="block", reuse_steps=1,
                                   tile=None, group_size=None)
    again = [_run(explicit, random_inputs(model, grid, text_tokens=5, timestep=t)) for t in (900, 500, 500)]
    assert all(torch.equal(a, b) for a, b in zip(outs, again))


# ---------------------------------------------------------------------------------------------------------------
# plan="group"
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["atc", "tome"])
def test_unet_group_plan_is_one_plan_per_resolution(method, monkeypatch):
    unet = _unet()
    inputs = random_inputs(unet, (UNET_LATENT, UNET_LATENT), text_tokens=7)
    sizes = {UNET_LATENT ** 2: UNET_LATENT, (UNET_LATENT // 2) ** 2: UNET_LATENT // 2}

    def group_fn(x, r):
        if method == "atc":
            return atc_groups_sklearn(x, r, "average")
        return tome_sd_groups(x, r, sizes[x.shape[1]], sizes[x.shape[1]])

    expected = _run(reference_model(unet, group_fn, 0.5, block_list=unet_blocks,
                                    plan_key=lambda i, n, k: n), inputs)
    counter = ClusteringCalls(monkeypatch)
    atc.patch.diffusers(unet, method=method, ratio=0.5, max_downsample=2, plan="group", use_rand=False)
    got = _run(unet, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert merge_info(unet)["plans"] == 2, "one plan per resolution (full and half)"
    assert counter.calls == (2 if method == "atc" else 0)
    per_block = _run(atc.patch.diffusers(unet, method=method, ratio=0.5, max_downsample=2, use_rand=False), inputs)
    assert not torch.equal(per_block, got), "sharing a plan differs from planning every block"


@pytest.mark.parametrize("family, group_size", [("pixart", 2), ("sd35", None), ("flux", 3)])
def test_dit_group_plan_matches_brute_force(family, group_size):
    model = build_denoiser(f"{family}-tiny", perturb=0.05)
    grid = (4, 6)
    inputs = random_inputs(model, grid, text_tokens=5)
    expected = _run(reference_model(model, lambda x, r: atc_groups_sklearn(x, r, "complete"), 0.5, ("attn", "mlp"),
                                    plan_key=lambda i, n, k: k // group_size if group_size else 0), inputs)
    atc.patch.diffusers(model, method="atc", ratio=0.5, linkage="complete", merge_mlp=True, plan="group",
                        group_size=group_size)
    torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-4, atol=1e-5)
    blocks = len(merge_info(model)["tokens"])
    assert merge_info(model)["plans"] == (-(-blocks // group_size) if group_size else 1)


# ---------------------------------------------------------------------------------------------------------------
# reuse_steps
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reuse_steps", [2, 3])
def test_reuse_steps_recomputes_exactly_every_k_steps(reuse_steps, monkeypatch):
    model = build_denoiser("pixart-tiny", perturb=0.05)
    counter = ClusteringCalls(monkeypatch)
    atc.patch.diffusers(model, method="atc", ratio=0.5, reuse_steps=reuse_steps)
    blocks = len(model.transformer_blocks)
    timesteps = [999, 800, 600, 400, 200, 1]
    planned = []
    for t in timesteps:
        before = counter.calls
        _run(model, random_inputs(model, (4, 6), text_tokens=5, timestep=t, seed=int(t)))
        # a second call at the same timestep (a pipeline running the unconditional batch on its own) is the same step
        _run(model, random_inputs(model, (4, 6), text_tokens=5, timestep=t, seed=int(t) + 1))
        planned.append((counter.calls - before) // blocks)
    assert planned == [1 if s % reuse_steps == 0 else 0 for s in range(len(timesteps))]
    # a new trajectory (the timestep goes up again) and another batch size plan afresh
    before = counter.calls
    _run(model, random_inputs(model, (4, 6), text_tokens=5, timestep=999))
    _run(model, random_inputs(model, (4, 6), batch=4, text_tokens=5, timestep=800))
    assert counter.calls - before == 2 * blocks


def test_reuse_steps_reuses_the_plan_of_the_step_that_computed_it():
    """Step 1 with reuse_steps=2 merges with step 0's clusters: its output equals a brute-force run that merges
    step 1's tokens with the groups of step 0's block inputs."""
    model = build_denoiser("sd3-tiny", perturb=0.05)
    first = random_inputs(model, (4, 6), text_tokens=5, timestep=900, seed=1)
    second = random_inputs(model, (4, 6), text_tokens=5, timestep=700, seed=2)
    recorded: dict[int, list] = {}

    def recording(x, r):
        groups = atc_groups_sklearn(x, r, "average")
        recorded[len(recorded)] = groups
        return groups

    ref = reference_model(model, recording, 0.5)
    _run(ref, first)
    replay = iter(recorded[i] for i in sorted(recorded))
    expected = _run(reference_model(model, lambda x, r: next(replay), 0.5), second)
    planned_afresh = _run(reference_model(model, lambda x, r: atc_groups_sklearn(x, r, "average"), 0.5), second)
    atc.patch.diffusers(model, method="atc", ratio=0.5, reuse_steps=2)
    _run(model, first)
    torch.testing.assert_close(_run(model, second), expected, rtol=1e-4, atol=1e-5)
    reseed(model, 0)  # forgets the kept plans: the next call plans afresh
    torch.testing.assert_close(_run(model, second), planned_afresh, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd15", "flux"])
def test_reuse_steps_in_pipelines_with_several_images(kind, monkeypatch):
    """A pipeline run with classifier-free guidance (SD) and several images per prompt: the plans are computed at
    steps 0, 2, 4 of every call (ceil(5/2) per image batch), reused in between."""
    pipe = build_tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=32, width=32) if kind == "flux" else {}
    counter = ClusteringCalls(monkeypatch)
    atc.patch.diffusers(pipe, method="atc", ratio=0.5, plan="group", reuse_steps=2)
    kwargs = dict(prompt="a tench", num_inference_steps=5, num_images_per_prompt=2, output_type="np", **size)
    images = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    per_call = counter.calls
    assert per_call == 3, "one group plan (full resolution / all blocks) at steps 0, 2 and 4"
    again = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert counter.calls == 2 * per_call, "the second pipeline call is a new trajectory"
    assert np.array_equal(images, again)


# ---------------------------------------------------------------------------------------------------------------
# tile
# ---------------------------------------------------------------------------------------------------------------
def test_split_removals_and_tiles():
    assert grid_tiles(3, 5, 2, 2) == [[0, 1, 5, 6], [2, 3, 7, 8], [4, 9], [10, 11], [12, 13], [14]]
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 40, rng.integers(1, 9)).tolist()
        r = int(rng.integers(0, sum(sizes) - len(sizes) + 1))
        out = split_removals(sizes, r)
        assert sum(out) == r and all(0 <= o <= n - 1 for o, n in zip(out, sizes))
        if all(r * n / sum(sizes) <= n - 1 for n in sizes):  # no part capped: proportional within one token
            assert all(abs(o - r * n / sum(sizes)) < 1 for o, n in zip(out, sizes))
    with pytest.raises(ValueError, match="cannot remove"):
        split_removals([3, 1], 3)


@pytest.mark.parametrize("h, w, tile", [(8, 8, (4, 4)), (7, 10, (3, 4)), (5, 9, (5, 2)), (6, 6, (8, 8))])
@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
def test_tiled_atc_equals_each_tile_clustered_alone(h, w, tile, linkage):
    gen = torch.Generator().manual_seed(h * 100 + w)
    for ratio in (0.25, 0.6):
        metric = torch.randn(3, h * w, 6, generator=gen)
        r = int(h * w * ratio)
        m = tiled_atc_merge(metric, r, (h, w), tile, linkage=linkage, backend="numba")
        tiles = grid_tiles(h, w, *tile)
        removals = split_removals([len(t) for t in tiles], r)
        stitched = torch.empty(3, h * w, dtype=torch.long)
        base = 0
        for t, rt in zip(tiles, removals):
            local = agglomerative_clustering(metric[:, t], len(t) - rt, linkage, backend="numba")
            stitched[:, t] = local + base
            base += len(t) - rt
        assert m.num_out == h * w - r
        assert torch.equal(m.labels, canonical_labels(stitched)), (h, w, tile, ratio)


def test_tiled_atc_in_a_model_matches_brute_force():
    model = build_denoiser("pixart-tiny", perturb=0.05)
    grid = (5, 7)
    inputs = random_inputs(model, grid, text_tokens=5)
    expected = _run(reference_model(model, lambda x, r: tiled_groups(x, r, *grid, 2, 3, "average"), 0.5), inputs)
    atc.patch.diffusers(model, method="atc", ratio=0.5, tile=(2, 3))
    torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-4, atol=1e-5)
    unet = _unet()
    inputs = random_inputs(unet, (UNET_LATENT, UNET_LATENT), text_tokens=7)
    sides = {UNET_LATENT ** 2: UNET_LATENT, (UNET_LATENT // 2) ** 2: UNET_LATENT // 2}
    expected = _run(reference_model(unet, lambda x, r: tiled_groups(x, r, sides[x.shape[1]], sides[x.shape[1]], 4, 4,
                                                                    "single"), 0.5, block_list=unet_blocks,
                                    plan_key=lambda i, n, k: n), inputs)
    atc.patch.diffusers(unet, method="atc", ratio=0.5, max_downsample=2, tile=4, plan="group", linkage="single")
    torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-4, atol=1e-5)


def test_bad_plan_options_are_clear_errors():
    model = build_denoiser("dit-tiny")
    with pytest.raises(ValueError, match="unknown plan 'shared'"):
        atc.patch.diffusers(model, plan="shared")
    with pytest.raises(ValueError, match="reuse_steps must be a positive integer"):
        atc.patch.diffusers(model, reuse_steps=0)
    with pytest.raises(ValueError, match="group_size=2 applies to plan='group'"):
        atc.patch.diffusers(model, group_size=2)
    with pytest.raises(ValueError, match="tile must be a positive int or"):
        atc.patch.diffusers(model, tile=(4, 0))
    with pytest.raises(ValueError, match="ToMe-SD is already local"):
        atc.patch.diffusers(model, method="tome", tile=4)
    atc.patch.diffusers(model, method="atc", ratio=0.9, tile=(1, 2))
    with pytest.raises(ValueError, match=r"keeps one token per tile.*use larger tiles"):
        _run(model, random_inputs(model, (4, 4)))
