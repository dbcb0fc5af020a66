"""atc.patch.diffusers on tiny random UNets (SD-1.x and SDXL layouts), against brute-force references."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention import BasicTransformerBlock  # noqa: E402

import atc.patch  # noqa: E402
import atc.sd.tiny_pipeline as tiny  # noqa: E402
from atc.patch.diffusion import reseed, sd_destination_mask, token_grid_downsample  # noqa: E402

from _diffusion_reference import atc_groups_sklearn, reference_model, tome_sd_groups, unet_blocks  # noqa: E402

LATENT = 16  # 16×16 latent: 256 tokens at full resolution, 64 at downsampling 2


def make_unet(sdxl: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny.tiny_unet_config(sdxl)).eval()


def make_inputs(unet: UNet2DConditionModel, batch: int = 2, sdxl: bool = False) -> dict:
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        sample=torch.randn(batch, 4, LATENT, LATENT, generator=gen),
        timestep=torch.tensor(300),
        encoder_hidden_states=torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen),
    )
    if sdxl:
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=gen),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(batch, 1),
        }
    return inputs


@torch.no_grad()
def run(unet, inputs) -> torch.Tensor:
    return unet(**inputs).sample


def blocks(unet):
    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


class TokenRecorder:
    """Records how many tokens given submodules of every block receive (independent of the patch)."""

    def __init__(self, unet, names=("attn1.to_q", "attn1.to_k", "attn2.to_q", "ff")):
        self.seen: list[tuple[int, str, int, int]] = []
        self.handles = []
        for i, block in enumerate(blocks(unet)):
            for name in names:
                module = block.get_submodule(name)
                self.handles.append(module.register_forward_pre_hook(self._hook(i, name)))
        self.unet = unet

    def _hook(self, i, name):
        def hook(module, args):
            self.seen.append((i, name, args[0].shape[1], 0))

        return hook

    def counts(self) -> dict[tuple[int, str], int]:
        return {(i, name): n for i, name, n, _ in self.seen}

    def close(self):
        for h in self.handles:
            h.remove()


def block_resolution(unet, inputs) -> dict[int, int]:
    """Tokens each block gets (unpatched), to know which blocks are at full resolution."""
    rec = TokenRecorder(unet, names=("attn1.to_q",))
    run(unet, inputs)
    rec.close()
    return {i: n for (i, _), n in rec.counts().items()}


# ----------------------------------------------------------------------------------------------------------------
# Brute-force reference (tests/_diffusion_reference.py): self-attention of the full-resolution blocks on tokens
# merged with loops
# ----------------------------------------------------------------------------------------------------------------
def reference_unet(unet, method: str, ratio: float, linkage: str = "average", **kwargs):
    """A copy of ``unet`` whose full-resolution blocks merge/unmerge (by default self-attention) with loops."""
    if method == "atc":
        def group_fn(x, r):
            return atc_groups_sklearn(x, r, linkage)
    else:
        def group_fn(x, r):
            return tome_sd_groups(x, r, LATENT, LATENT)
    return reference_model(unet, group_fn, ratio, block_list=unet_blocks,
                           merge_when=lambda n: n == LATENT * LATENT, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["atc", "tome"])
def test_matches_brute_force_reference(method):
    unet = make_unet()
    inputs = make_inputs(unet)
    expected = run(reference_unet(unet, method, 0.5), inputs)
    atc.patch.diffusers(unet, method=method, ratio=0.5, use_rand=False, linkage="average")
    got = run(unet, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    plain = run(atc.patch.remove(unet), inputs)
    assert (got - plain).abs().max() > 1e-4, "merging half the tokens must change the output"


@pytest.mark.parametrize("method", ["atc", "tome"])
def test_ratio_zero_identical_and_remove_restores(method):
    unet = make_unet()
    inputs = make_inputs(unet)
    state_before = {k: v.clone() for k, v in unet.state_dict().items()}
    expected = run(unet, inputs)

    atc.patch.diffusers(unet, method=method, ratio=0.0)
    assert torch.equal(run(unet, inputs), expected)

    atc.patch.diffusers(unet, method=method, ratio=0.5, merge_crossattn=True, merge_mlp=True)
    assert not torch.equal(run(unet, inputs), expected)
    assert unet._atc_patch_module == "diffusion"

    atc.patch.remove(unet)
    assert not hasattr(unet, "_atc_patch_module") and not hasattr(unet, "_atc_sd_state")
    assert type(unet) is UNet2DConditionModel
    for module in unet.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {type(module).__name__}"
    state_after = unet.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    assert torch.equal(run(unet, inputs), expected)


@pytest.mark.parametrize("method", ["atc", "tome"])
def test_half_the_tokens_at_full_resolution_only(method):
    unet = make_unet()
    inputs = make_inputs(unet)
    full = block_resolution(unet, inputs)
    assert sorted(set(full.values())) == [64, 256], "tiny SD layout: blocks at full and half resolution"

    atc.patch.diffusers(unet, method=method, ratio=0.5, merge_attn=True, merge_crossattn=False, merge_mlp=False)
    rec = TokenRecorder(unet)
    run(unet, inputs)
    seen = rec.counts()
    for i, n in full.items():
        expect_attn = n - int(n * 0.5) if n == 256 else n
        assert seen[(i, "attn1.to_q")] == seen[(i, "attn1.to_k")] == expect_attn
        assert seen[(i, "attn2.to_q")] == n and seen[(i, "ff")] == n
    rec.close()

    atc.patch.diffusers(unet, method=method, ratio=0.5, merge_attn=False, merge_crossattn=True, merge_mlp=True)
    rec = TokenRecorder(unet)
    run(unet, inputs)
    seen = rec.counts()
    for i, n in full.items():
        reduced = n - int(n * 0.5) if n == 256 else n
        assert seen[(i, "attn1.to_q")] == n
        assert seen[(i, "attn2.to_q")] == seen[(i, "ff")] == reduced
    rec.close()

    atc.patch.diffusers(unet, method=method, ratio=0.25, max_downsample=2)
    rec = TokenRecorder(unet)
    run(unet, inputs)
    assert all(rec.counts()[(i, "attn1.to_q")] == n - int(n * 0.25) for i, n in full.items())
    rec.close()
    atc.patch.remove(unet)


@pytest.mark.parametrize("method", ["atc", "tome"])
def test_sdxl_layout(method):
    unet = make_unet(sdxl=True)
    inputs = make_inputs(unet, sdxl=True)
    full = block_resolution(unet, inputs)
    assert set(full.values()) == {64}, "SDXL layout has no transformer at full resolution"
    expected = run(unet, inputs)

    atc.patch.diffusers(unet, method=method, ratio=0.5, max_downsample=1)
    with pytest.warns(UserWarning, match="merged no tokens .* outside max_downsample=1 .* use max_downsample=2"):
        assert torch.equal(run(unet, inputs), expected), "nothing to merge at full resolution in SDXL"

    atc.patch.diffusers(unet, method=method, ratio=0.5, max_downsample=2)
    rec = TokenRecorder(unet, names=("attn1.to_k",))
    out = run(unet, inputs)
    assert set(rec.counts().values()) == {32}
    assert not torch.equal(out, expected)
    rec.close()
    atc.patch.remove(unet)
    assert torch.equal(run(unet, inputs), expected)


def test_random_destinations_change_with_seed():
    unet = make_unet()
    inputs = make_inputs(unet)
    outs = []
    for seed in (0, 0, 1):
        atc.patch.diffusers(unet, method="tome", ratio=0.5, use_rand=True, seed=seed)
        outs.append(run(unet, inputs))
    atc.patch.diffusers(unet, method="tome", ratio=0.5, use_rand=False)
    fixed = run(unet, inputs)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], fixed)


@pytest.mark.parametrize("h,w,sx,sy", [(4, 6, 2, 2), (5, 7, 2, 2), (6, 6, 3, 2)])
def test_destination_mask_one_per_cell(h, w, sx, sy):
    for generator in (None, torch.Generator().manual_seed(3)):
        mask = sd_destination_mask(h, w, sx, sy, generator).reshape(h, w)
        for row in range(0, h, sy):
            for col in range(0, w, sx):
                cell = mask[row : row + sy, col : col + sx]
                full = row + sy <= h and col + sx <= w
                assert int(cell.sum()) == (1 if full else 0)
                if full and generator is None:
                    assert cell[0, 0]


def test_token_grid_downsample():
    assert token_grid_downsample(64 * 64, 64, 64) == 1
    assert token_grid_downsample(32 * 48, 64, 96) == 2
    assert token_grid_downsample(13 * 7, 50, 25) == 4  # ceil(50/4)=13, ceil(25/4)=7
    assert token_grid_downsample(77, 64, 64) is None


def test_bad_options_are_clear_errors():
    unet = make_unet()
    with pytest.raises(ValueError, match="unknown method"):
        atc.patch.diffusers(unet, method="kmeans")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        atc.patch.diffusers(unet, method="atc", ratio=1.0)
    with pytest.raises(ValueError, match="at most 1 - 1/\\(sx\\*sy\\) = 0.75"):
        atc.patch.diffusers(unet, method="tome", ratio=0.8)
    with pytest.raises(ValueError, match="unknown linkage"):
        atc.patch.diffusers(unet, linkage="ward")
    with pytest.raises(ValueError, match="max_downsample"):
        atc.patch.diffusers(unet, max_downsample=0)
    with pytest.raises(ValueError, match="Linear is not a denoiser the diffusers patch supports"):
        atc.patch.diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="blocks: index 7 is out of range for a model with 7 transformer blocks"):
        atc.patch.diffusers(unet, blocks=[7])
    assert not hasattr(unet, "_atc_patch_module"), "a failed patch leaves the model untouched"

    atc.patch.diffusers(unet, method="atc", ratio=0.5, merge_mlp=True)
    for block in blocks(unet):
        block.set_chunk_feed_forward(2, 1)
    with pytest.raises(ValueError, match="disable_forward_chunking"):
        run(unet, make_inputs(unet))


def test_blocks_option_selects_unet_blocks():
    """`blocks` (indices in the UNet's module order) combines with max_downsample: only the chosen blocks merge."""
    from atc.patch.diffusion import merge_info

    unet = make_unet()
    inputs = make_inputs(unet)
    full = block_resolution(unet, inputs)
    chosen = [0, 3, 6]
    atc.patch.diffusers(unet, method="atc", ratio=0.5, max_downsample=2, blocks=chosen)
    run(unet, inputs)
    assert merge_info(unet)["tokens"] == {i: (full[i], full[i] - int(full[i] * 0.5)) for i in chosen}
    atc.patch.diffusers(unet, method="atc", ratio=0.5, max_downsample=1, blocks=[i for i in full if full[i] == 64])
    with pytest.warns(UserWarning, match="outside max_downsample=1"):
        run(unet, inputs)
