"""atc.patch.diffusers on diffusion transformers (PixArt, DiT, SD3/SD3.5, Flux), tiny random models built offline,
against brute-force references (tests/_diffusion_reference.py) and the unpatched model."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import atc.patch  # noqa: E402
from atc.patch.diffusion import find_denoiser, merge_info, reseed  # noqa: E402
from atc.sd.denoisers import build_denoiser, random_inputs  # noqa: E402
from atc.sd.tiny_pipeline import build_tiny_pipeline  # noqa: E402

from _diffusion_reference import atc_groups_sklearn, reference_model, tome_sd_groups, transformer_blocks  # noqa: E402

FAMILIES = ("pixart", "dit", "sd3", "sd35", "flux")
# usual patch sizes (2; Flux 1 on packed latents) on a non-square grid, except DiT, whose diffusers model only
# unpatchifies square latents
GRID = {"pixart": (4, 6), "dit": (4, 4), "sd3": (4, 6), "sd35": (4, 6), "flux": (4, 6)}


def _model_and_inputs(family: str, batch: int = 2, grid=None):
    model = build_denoiser(f"{family}-tiny", perturb=0.05)
    return model, random_inputs(model, grid or GRID[family], batch=batch, text_tokens=5)


@torch.no_grad()
def _run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


def _groups(method: str, grid, linkage: str = "average", generator=None):
    if method == "atc":
        return lambda x, r: atc_groups_sklearn(x, r, linkage)
    return lambda x, r: tome_sd_groups(x, r, *grid, generator=generator)


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_is_identical_and_remove_restores(family):
    model, inputs = _model_and_inputs(family)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _run(model, inputs)
    for method in ("atc", "tome"):
        atc.patch.diffusers(model, method=method, ratio=0.0, merge_mlp=True)
        assert torch.equal(_run(model, inputs), expected), f"{method} at ratio 0 must be the unpatched model"
    atc.patch.diffusers(model, method="atc", ratio=0.5, merge_mlp=True)
    assert not torch.equal(_run(model, inputs), expected)
    assert model._atc_patch_module == "diffusion"
    atc.patch.remove(model)
    assert not hasattr(model, "_atc_patch_module") and not hasattr(model, "_atc_sd_state")
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {type(module).__name__}"
    state_after = model.state_dict()
    assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    assert torch.equal(_run(model, inputs), expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, linkage", [("atc", "single"), ("atc", "complete"), ("atc", "average"),
                                             ("tome", None)])
def test_matches_brute_force_reference(family, method, linkage):
    model, inputs = _model_and_inputs(family)
    grid = GRID[family]
    options = ("attn", "mlp") if linkage != "complete" else ("attn",)
    expected = _run(reference_model(model, _groups(method, grid, linkage or "average"), 0.5, options), inputs)
    atc.patch.diffusers(model, method=method, ratio=0.5, linkage=linkage or "average", use_rand=False,
                        merge_mlp="mlp" in options)
    got = _run(model, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - _run(atc.patch.remove(model), inputs)).abs().max() > 1e-3, "merging must change the output"


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_tome_random_destinations_match_reference_and_reseed(family):
    model, inputs = _model_and_inputs(family)
    grid = GRID[family]
    if family == "flux":
        inputs["img_ids"] = inputs["img_ids"].clone()
    expected = _run(reference_model(model, _groups("tome", grid, generator=torch.Generator().manual_seed(7)), 0.5),
                    inputs)
    atc.patch.diffusers(model, method="tome", ratio=0.5, use_rand=True, seed=7)
    got = _run(model, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(_run(model, inputs), got), "the generator moves on between forward passes"
    reseed(model, 7)
    assert torch.equal(_run(model, inputs), got), "reseed makes the random destinations reproducible"


def test_pixart_cross_attention_queries_and_block_selection():
    model, inputs = _model_and_inputs("pixart")
    chosen = [1, 2]
    options = ("attn", "crossattn")
    expected = _run(reference_model(model, _groups("atc", GRID["pixart"]), 0.25, options, blocks=chosen), inputs)
    atc.patch.diffusers(model, method="atc", ratio=0.25, merge_crossattn=True, blocks=[-2, 2])
    torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-4, atol=1e-5)
    assert sorted(merge_info(model)["tokens"]) == chosen


@pytest.mark.parametrize("family", FAMILIES)
def test_token_counts_and_text_tokens(family):
    model, inputs = _model_and_inputs(family)
    n = GRID[family][0] * GRID[family][1]
    seen: list[tuple[str, int, int | None]] = []

    def record(name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            enc = kwargs.get("encoder_hidden_states")
            seen.append((name, x.shape[1], None if enc is None else enc.shape[1]))

        return hook

    atc.patch.diffusers(model, method="atc", ratio=0.5, merge_mlp=True)
    for block in transformer_blocks(model):  # registered after the patch's hooks: sees what the module gets
        for name in ("attn1", "attn", "attn2", "ff", "proj_mlp"):
            sub = getattr(block, name, None)
            if sub is not None:
                sub.register_forward_pre_hook(record(name), with_kwargs=True)
    text = inputs.get("encoder_hidden_states")
    text_len = 0 if text is None else text.shape[1]
    _run(model, inputs)
    kept = n - int(n * 0.5)
    blocks = len(transformer_blocks(model))
    assert merge_info(model) == {"tokens": {i: (n, kept) for i in range(blocks)}, "plans": blocks}
    for name, tokens, enc in seen:
        if name == "attn2" and family == "pixart":  # cross-attention queries are not merged by default
            assert tokens == n
        elif family == "flux" and tokens > kept:  # one-stream blocks: text tokens first, all kept
            assert tokens == text_len + kept
        else:
            assert tokens == kept, (name, tokens)
        if enc is not None and name != "attn2":
            assert enc == text_len, "text tokens keep their number"


def test_flux_text_stream_is_untouched_by_a_merge_that_changes_images():
    """The text stream of a two-stream block attends to merged images but its own tokens are never merged."""
    model, inputs = _model_and_inputs("flux")
    outs = {}

    def capture(module, args, kwargs, output):
        outs.setdefault("text", []).append(output[0].shape)

    model.transformer_blocks[0].register_forward_hook(capture, with_kwargs=True)
    atc.patch.diffusers(model, method="atc", ratio=0.5)
    _run(model, inputs)
    assert outs["text"][0] == inputs["encoder_hidden_states"].shape[:2] + (model.inner_dim,)


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_cfg_batch_and_other_grids(family):
    """Any grid the model accepts and a batch of several samples with classifier-free guidance."""
    grid = (6, 4) if family != "flux" else (5, 3)
    model, inputs = _model_and_inputs(family, batch=4, grid=grid)
    expected = _run(reference_model(model, _groups("atc", grid), 0.4), inputs)
    atc.patch.diffusers(model, method="atc", ratio=0.4)
    torch.testing.assert_close(_run(model, inputs), expected, rtol=1e-4, atol=1e-5)
    n = grid[0] * grid[1]
    assert set(merge_info(model)["tokens"].values()) == {(n, n - int(n * 0.4))}


def test_nothing_to_merge_warns():
    model, inputs = _model_and_inputs("sd3", grid=(2, 2))
    expected = _run(model, inputs)
    atc.patch.diffusers(model, method="atc", ratio=0.2)  # int(4 * 0.2) = 0
    with pytest.warns(UserWarning, match=r"merged no tokens .* r = int\(4 tokens \* ratio 0.2\) = 0"):
        assert torch.equal(_run(model, inputs), expected)
    model2, inputs2 = _model_and_inputs("sd3", grid=(1, 6))
    atc.patch.diffusers(model2, method="tome", ratio=0.5)  # a 1x6 grid has no full 2x2 cell
    with pytest.warns(UserWarning, match="no full 2x2 ToMe-SD cell"):
        _run(model2, inputs2)


def test_bad_options_are_clear_errors():
    model, _ = _model_and_inputs("flux")
    with pytest.raises(ValueError, match="blocks: index 9 is out of range .* 4 transformer blocks"):
        atc.patch.diffusers(model, blocks=[0, 9])
    with pytest.raises(ValueError, match="blocks selects no transformer block"):
        atc.patch.diffusers(model, blocks=[])
    with pytest.raises(TypeError, match="blocks must"):
        atc.patch.diffusers(model, blocks=3)
    with pytest.raises(ValueError, match=r"ratio .* \[0, 1\)"):
        atc.patch.diffusers(model, ratio=1.5)
    with pytest.raises(ValueError, match="merge_crossattn: FluxTransformer2DModel has no cross-attention"):
        atc.patch.diffusers(model, merge_crossattn=True)
    with pytest.raises(ValueError, match="not a denoiser the diffusers patch supports"):
        atc.patch.diffusers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert not hasattr(model, "_atc_patch_module"), "a failed patch leaves the model untouched"

    from diffusers.models.transformers.transformer_flux import FluxAttention

    class OtherProcessor:
        def __call__(self, attn, *args, **kwargs):
            raise AssertionError("never reached")

    model, inputs = _model_and_inputs("flux")
    model.transformer_blocks[0].attn.processor = OtherProcessor()
    assert isinstance(model.transformer_blocks[0].attn, FluxAttention)
    atc.patch.diffusers(model, method="atc", ratio=0.5)
    with pytest.raises(ValueError, match="needs its default FluxAttnProcessor"):
        _run(model, inputs)


@pytest.mark.parametrize("kind", ["sd15", "pixart", "sd3", "flux"])
def test_pipelines_patch_remove_and_reseed(kind):
    """A pipeline (UNet or transformer denoiser) is patched through the pipeline, reseeding makes ToMe-SD's random
    destinations reproducible, and remove gives the unpatched images back."""
    pipe = build_tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    denoiser = find_denoiser(pipe)
    size = {} if kind in ("sd15", "pixart") else dict(height=32, width=32)
    kwargs = dict(prompt="A high quality photograph of a tench.", num_inference_steps=2, output_type="np", **size)
    if kind == "pixart":
        kwargs["clean_caption"] = False
    expected = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    atc.patch.diffusers(pipe, method="tome", ratio=0.5)
    assert denoiser._atc_patch_module == "diffusion"
    reseed(pipe, 0)
    merged = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    reseed(pipe, 0)
    again = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (merged == again).all(), "reseeding makes ToMe-SD's random destinations reproducible"
    assert not (merged == expected).all()
    atc.patch.remove(pipe)
    assert not hasattr(denoiser, "_atc_patch_module")
    assert (pipe(generator=torch.Generator().manual_seed(0), **kwargs).images == expected).all()


@pytest.mark.parametrize("family, method, use_rand, options", [
    ("flux", "atc", False, {}), ("sd35", "atc", False, {"plan": "group", "tile": (2, 4)}),
    ("pixart", "tome", False, {"plan": "group"}), ("flux", "tome", True, {})])
def test_compiled_equals_eager(family, method, use_rand, options):
    """fullgraph=True (no graph break in the merge code) for ATC (tiles and group plans included) and fixed ToMe-SD
    destinations; ToMe-SD's random destinations (and Flux's grid, read from img_ids) break the graph, and still
    match eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, inputs = _model_and_inputs(family)
    atc.patch.diffusers(model, method=method, ratio=0.5, use_rand=use_rand, merge_mlp=True, **options)
    other = random_inputs(model, GRID[family], text_tokens=5, seed=5)
    reseed(model, 3)
    expected = [_run(model, inputs), _run(model, other)]
    fullgraph = not (use_rand or (family == "flux" and method == "tome"))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=fullgraph)
    reseed(model, 3)
    got = [_run(compiled, inputs), _run(compiled, other)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    if fullgraph:
        assert counters["stats"]["unique_graphs"] == 1, "one graph, compiled once"
    torch._dynamo.reset()
