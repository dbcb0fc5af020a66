"""SD_setup scripts end to end: generation with a tiny saved pipeline, resuming, class table, reference set."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atc.sd.imagenet_classes import IMAGENET_CLASSES, select_classes

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
SD_SETUP = ROOT / "SD_setup"


def _load(name: str):
    """A script of SD_setup/ as a module (the scripts import only the installed package, never each other)."""
    spec = importlib.util.spec_from_file_location(f"sd_setup_{name}", SD_SETUP / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sd_generate = _load("sd_generate")
valset = _load("create_im_valset")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_sd") / "pipe"
    _load("tiny_pipeline").main(["--output", str(path)])  # the documented smoke-run command
    return path


def common_args(model: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--output_dir", str(out), "--classes", "1", "goldfish", "n01484850",
            "--img_per_class", "2", "--num_inference_steps", "1", "--device", "cpu"]


def test_generate_end_to_end_and_resume(tiny_model, tmp_path):
    out = tmp_path / "gens"
    args = common_args(tiny_model, out) + ["--merge_fn_str", "atc", "--reduction_ratio", "0.5", "--merge_attn",
                                           "--linkage", "complete"]
    # run from another folder: the script finds everything through the installed package
    proc = subprocess.run([sys.executable, str(SD_SETUP / "sd_generate.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = out / "atc_complete_r0.5_md1_attn"
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == ["0001_0.png", "0001_1.png", "0002_0.png", "0002_1.png"], "class 1 given twice, once by name"
    assert Image.open(folder / "0001_0.png").size == (32, 32)
    meta = json.loads((folder / "generation.json").read_text())
    assert sorted(meta["durations"]) == names and all(d > 0 for d in meta["durations"].values())
    assert meta["args"]["merge_fn_str"] == "atc" and meta["args"]["reduction_ratio"] == 0.5
    first = {n: np.asarray(Image.open(folder / n)) for n in names}
    assert not np.array_equal(first["0001_0.png"], first["0001_1.png"]), "a seed per image"

    # Resume: nothing to do; then a deleted image is regenerated identically (its own seed).
    mtimes = {n: (folder / n).stat().st_mtime_ns for n in names}
    (folder / "0002_1.png").unlink()
    sd_generate.main(args)
    assert {n: (folder / n).stat().st_mtime_ns for n in names if n != "0002_1.png"} == {
        n: t for n, t in mtimes.items() if n != "0002_1.png"}
    assert np.array_equal(np.asarray(Image.open(folder / "0002_1.png")), first["0002_1.png"])

    # Continuing a folder with settings that change the images is refused.
    changed = [a if a != "complete" else "single" for a in args] + ["--experiment_name", folder.name]
    with pytest.raises(SystemExit, match="linkage: 'complete' -> 'single'"):
        sd_generate.main(changed)


def test_generate_tome_and_baseline_differ(tiny_model, tmp_path):
    out = tmp_path / "gens"
    base = common_args(tiny_model, out)[:6] + ["--classes", "0", "--img_per_class", "1", "--num_inference_steps", "2"]
    sd_generate.main(base + ["--merge_fn_str", "none"])
    sd_generate.main(base + ["--merge_fn_str", "tome", "--reduction_ratio", "0.5"])
    plain = np.asarray(Image.open(out / "none" / "0000_0.png"))
    merged = np.asarray(Image.open(out / "tome_r0.5_md1_attn_sx2sy2rand" / "0000_0.png"))
    assert plain.shape == merged.shape and not np.array_equal(plain, merged)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--reduction_ratio", "1.5"], "ratio"),
        (["--merge_fn_str", "tome", "--reduction_ratio", "0.9"], "at most"),
        (["--classes", "not-a-class"], "unknown ImageNet class"),
        (["--no-merge_attn"], "nothing to merge"),
        (["--img_per_class", "0"], "img_per_class"),
    ],
)
def test_generate_bad_arguments(tiny_model, tmp_path, extra, message):
    args = common_args(tiny_model, tmp_path) + ["--merge_fn_str", "atc"] + extra
    with pytest.raises(SystemExit, match=message):
        sd_generate.main(args)
    assert not any(tmp_path.glob("*/*.png"))


def test_generate_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="model_index.json"):
        sd_generate.main(["--model", str(tmp_path / "nothing"), "--output_dir", str(tmp_path)])


def test_class_table():
    table = IMAGENET_CLASSES
    assert [c.index for c in table] == list(range(1000))
    wnids = [c.wnid for c in table]
    assert wnids == sorted(wnids) and len(set(wnids)) == 1000 and all(w.startswith("n") for w in wnids)
    assert len({c.name for c in table}) == 1000
    assert (table[0].name, table[1].name, table[999].wnid) == ("tench", "goldfish", "n15075141")
    picked = select_classes(["5-7", "goldfish", "n01440764", "6"])
    assert [c.index for c in picked] == [0, 1, 5, 6, 7]
    with pytest.raises(ValueError, match="outside 0-999"):
        select_classes(["990-1000"])


def make_val_dir(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for wnid, n in counts.items():
        (root / wnid).mkdir(parents=True)
        for i in rng.permutation(n):
            img = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
            img.save(root / wnid / f"ILSVRC2012_val_{i:08d}.JPEG", format="JPEG")
    return root


def test_create_im_valset(tmp_path):
    val = make_val_dir(tmp_path / "val", {"n01440764": 7, "n01443537": 5, "n01484850": 9})
    out = tmp_path / "ref"
    valset.main(["--imagenet_val_dir", str(val), "--output_dir", str(out)])
    for wnid in ("n01440764", "n01443537", "n01484850"):
        expected = sorted(p.name for p in (val / wnid).iterdir())[:5]
        assert sorted(p.name for p in (out / wnid).iterdir()) == expected
        assert (out / wnid / expected[0]).read_bytes() == (val / wnid / expected[0]).read_bytes()


def test_create_im_valset_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        valset.main(["--imagenet_val_dir", str(tmp_path / "missing")])
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "a.JPEG")
    with pytest.raises(SystemExit, match="loose images"):
        valset.main(["--imagenet_val_dir", str(flat)])
    few = make_val_dir(tmp_path / "few", {"n01440764": 3})
    with pytest.raises(SystemExit, match="fewer than --per_class 5"):
        valset.main(["--imagenet_val_dir", str(few)])
    bad = make_val_dir(tmp_path / "bad", {"n01440764": 5})
    victim = sorted((bad / "n01440764").iterdir())[2]
    victim.write_bytes(b"broken")
    with pytest.raises(SystemExit, match=victim.name):
        valset.main(["--imagenet_val_dir", str(bad), "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generate_with_diffusion_transformer_pipelines(kind, tmp_path):
    """A saved SD3 (without its T5 encoder, as its smaller downloads are) or Flux folder: the pipeline type comes
    from model_index.json, the transformer is patched (only --blocks), and guidance defaults to the pipeline's."""
    model = tmp_path / kind
    _load("tiny_pipeline").main(["--output", str(model), "--kind", kind])
    out = tmp_path / "gens"
    args = ["--model", str(model), "--output_dir", str(out), "--classes", "0", "--img_per_class", "1",
            "--num_inference_steps", "2", "--device", "cpu", "--height", "32", "--width", "32"]
    sd_generate.main(args + ["--merge_fn_str", "none"])
    sd_generate.main(args + ["--merge_fn_str", "atc", "--reduction_ratio", "0.5", "--blocks", "0", "2"])
    folder = out / "atc_average_r0.5_b0-2_attn"  # no max_downsample in a transformer's name
    meta = json.loads((folder / "generation.json").read_text())
    assert meta["args"]["blocks"] == [0, 2]
    assert meta["args"]["guidance_scale"] == {"sd3": 7.0, "flux": 3.5}[kind]
    plain = np.asarray(Image.open(out / "none" / "0000_0.png"))
    merged = np.asarray(Image.open(folder / "0000_0.png"))
    assert plain.shape == merged.shape == (32, 32, 3) and not np.array_equal(plain, merged)
    with pytest.raises(SystemExit, match="blocks: index 9 is out of range"):
        sd_generate.main(args + ["--merge_fn_str", "atc", "--blocks", "9"])
    fast = sd_generate.main(args + ["--merge_fn_str", "atc", "--plan", "group", "--reuse_steps", "2", "--tile", "2"])
    assert fast.name == "atc_average_r0.5_attn_group_k2_tile2x2" and (fast / "0000_0.png").is_file()
    with pytest.raises(SystemExit, match="ToMe-SD is already local"):
        sd_generate.main(args + ["--merge_fn_str", "tome", "--tile", "2"])
