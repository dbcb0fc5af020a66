"""torch.compile on patched ViTs: whole-forward graphs that match eager, compile once, and a benchmark run.

The reference is the same patched model run eagerly (itself checked against brute force and the unpatched model
in test_patch_timm.py); dynamo's counters say how many graphs were compiled (``counters["frames"]`` is only kept
for ``fullgraph=False``, so graphs are counted with ``counters["stats"]["unique_graphs"]``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch._dynamo
from timm.models.eva import Eva
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch._dynamo.utils import counters

import atc.patch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=5)
R = [2, 3, 0, 2]  # 17 -> 15 -> 12 -> 12 -> 10 tokens; block 2 removes nothing but attends with sizes


def _has_clustering_op() -> bool:
    try:
        torch.ops.atc.agglomerative_clustering
    except (AttributeError, RuntimeError):
        return False
    return True


_NEEDS_OP = pytest.mark.skipif(not _has_clustering_op(),
                               reason="ATC traces once clustering is the custom op atc::agglomerative_clustering")
CASES = [("tome", "average"), ("kmedoids", "average"), ("dpcknn", "average")] + [
    pytest.param("atc", linkage, marks=_NEEDS_OP, id=f"atc-{linkage}") for linkage in ("single", "complete", "average")
]


def _tiny(method: str, linkage: str = "average", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = (Eva if kwargs.pop("eva", False) else VisionTransformer)(**TINY, **kwargs)
    with torch.no_grad():  # random init leaves biases and norms trivial: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for m in model.modules():
            if getattr(m, "k_bias", None) is not None:
                m.k_bias.zero_()
    atc.patch.timm(model, method=method, linkage=linkage, trace_source=True)
    model.r = R
    return model.eval()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _check_compiled(model: torch.nn.Module, backend: str = "aot_eager", atol: float = 1e-6) -> None:
    """Compile with fullgraph=True (any graph break is an error), compare with eager, call again: no recompile."""
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref1 = model(x1)
        tokens, token_map, size = model._atc_info["tokens"], model._atc_info["token_map"], model._atc_info["size"]
        ref2 = model(x2)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        out1 = compiled(x1)
    torch.testing.assert_close(out1, ref1, rtol=1e-4, atol=atol)
    # the per-forward record is written back by the compiled forward too
    info = model._atc_info
    assert info["tokens"] == tokens
    assert torch.equal(info["token_map"], token_map)
    torch.testing.assert_close(info["size"], size)
    # one graph for the whole model: at most one compilation per distinct block type
    assert counters["stats"]["unique_graphs"] == 1 <= len({type(b) for b in model.blocks})
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        out2 = compiled(x2)
    torch.testing.assert_close(out2, ref2, rtol=1e-4, atol=atol)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("method,linkage", CASES)
def test_fullgraph_matches_eager_and_compiles_once(method, linkage):
    _check_compiled(_tiny(method, linkage))


@pytest.mark.parametrize("family", ["post_norm", "eva_rope"])
def test_other_block_types_compile(family):
    """Post-norm blocks and EVA's rotary tables (merged along with the tokens) trace as well."""
    kwargs = dict(block_fn=ResPostBlock) if family == "post_norm" else dict(
        eva=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4), init_values=0.5)
    _check_compiled(_tiny("tome", **kwargs))


def test_changing_r_recompiles_to_the_new_counts():
    model = _tiny("tome")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        compiled(x)
        compiled.r = 1  # forwarded to the model: the counts are decided from r, so dynamo guards on it
        out = compiled(x)
        assert model._atc_info["tokens"] == [16, 15, 14, 13]
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 2


def test_training_step_matches_eager():
    """DPC-KNN's learnable token weights get the same gradients through the compiled graph."""
    model = _tiny("dpcknn").train()
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.compile(model, backend="aot_eager", fullgraph=True)(x).square().sum().backward()
    assert model.blocks[0].atc_token_score.weight.grad.abs().sum() > 0
    assert model.blocks[2].atc_token_score.weight.grad is None  # block 2 removes nothing: its score is unused
    for name, p in model.named_parameters():
        if ref[name] is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_inductor_matches_eager():
    """One small case through inductor (C++ kernels on CPU; the first compile in a process takes ~20 s)."""
    torch.manual_seed(0)
    model = _tiny("tome")
    _check_compiled(model, backend="inductor", atol=1e-5)


def test_benchmark_script_compiles_and_reports_flops(tmp_path):
    spec = importlib.util.spec_from_file_location("benchmark_merging_method", ROOT / "benchmark_merging_method.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--model", "tome_tiny_patch16_224", "--reduction_ratio", "0.7", "--input_size", "64",
                        "--runs", "2", "--batch_sizes", "0", "--no_r0_check", "--compile", "default",
                        "--output_dir", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "throughput.csv", keep_default_na=False)
    assert {"gflops", "tokens", "final_tokens", "latency_ms", "peak_memory_mib", "compile"} <= set(df.columns)
    base, tome = df.iloc[0], df.iloc[1]
    assert base.model == "deit_tiny_patch16_224" and tome.model == "tome_tiny_patch16_224"
    assert (df.compile == "default").all() and (df.latency_ms > 0).all() and (df.peak_memory_mib == "").all()
    # 64 px: 16 patches + CLS; keep 0.7 at blocks 3, 6, 9 -> 11, 7, 5 patches
    assert base.tokens == "-".join(["17"] * 12) and base.final_tokens == 17
    assert tome.tokens == "17-17-17-12-12-12-8-8-8-6-6-6" and tome.final_tokens == 6
    # deit-tiny at 64 px: 12 blocks of 17 tokens, 2 FLOPs per multiply-add
    assert 0.15 < base.gflops < 0.25 and tome.gflops < 0.8 * base.gflops


# ------------------------------------------------------------------------------------ more model families
def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _check_compiled_call(model: torch.nn.Module, call, atol: float = 1e-5) -> None:
    """As :func:`_check_compiled` for any patched model: ``call(module, images)`` returns its main output."""
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref1 = call(model, x1)
        tokens = model._atc_info["tokens"]
        ref2 = call(model, x2)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(call(compiled, x1), ref1, rtol=1e-4, atol=atol)
    assert model._atc_info["tokens"] == tokens
    assert counters["stats"]["unique_graphs"] == 1
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        torch.testing.assert_close(call(compiled, x2), ref2, rtol=1e-4, atol=atol)
    assert counters["stats"]["unique_graphs"] == 1


TIMM_FAMILIES = {
    "siglip_map": lambda: VisionTransformer(**TINY, class_token=False, global_pool="map"),
    "rope_vit_gqa": lambda: Eva(**TINY, attn_type="rope", qkv_fused=False, num_kv_heads=1, use_rot_pos_emb=True,
                                use_abs_pos_emb=False, init_values=0.5),
}


@pytest.mark.parametrize("family,method,linkage", [(f, "tome", "average") for f in TIMM_FAMILIES] + [
    pytest.param("rope_vit_gqa", "atc", "average", marks=_NEEDS_OP, id="rope_vit_gqa-atc")])
def test_timm_attention_pool_and_rope_vits_compile(family, method, linkage):
    torch.manual_seed(0)
    model = _perturb(TIMM_FAMILIES[family]())
    atc.patch.timm(model, method=method, linkage=linkage, trace_source=True)
    model.r = R
    _check_compiled_call(model, lambda m, x: m(x))


def _transformers_families():
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8)
    return {
        "vit": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**small, num_labels=3)),
        "clip": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**small)),
        "siglip": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**small)),
        "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**small)),
    }


def _hf_output(module, x):
    out = module(pixel_values=x)
    return out.logits if getattr(out, "logits", None) is not None else out.pooler_output


@pytest.mark.parametrize("family,method,linkage", [(f, "tome", "average") for f in ("vit", "clip", "siglip", "dinov2")]
                         + [pytest.param("siglip", "atc", "complete", marks=_NEEDS_OP, id="siglip-atc")])
def test_transformers_towers_compile(family, method, linkage):
    torch.manual_seed(0)
    model = _perturb(_transformers_families()[family]())
    atc.patch.transformers(model, method=method, linkage=linkage, trace_source=True)
    model.r = R
    _check_compiled_call(model, _hf_output)
