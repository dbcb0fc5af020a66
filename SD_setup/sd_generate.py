"""Generate ImageNet-class images with a diffusers text-to-image pipeline (Stable Diffusion 1.x/2.x, SDXL, PixArt-α/Σ,
SD3/SD3.5, Flux), optionally with ATC or ToMe-SD token merging.

Protocol of the ATC paper (after ToMe-SD): for every ImageNet class, ``--img_per_class`` images of the prompt
"A high quality photograph of a {class name}.", each with its own seed (``--seed + class_index *
img_per_class + j``), so a run can be split over machines, stopped and continued, and every image is the same
whatever subset of classes is generated. Images go to ``--output_dir/<experiment>/<class index>_<j>.png``;
``generation.json`` in that folder holds the arguments and every image's generation time (seconds).
Already generated images are skipped, so rerunning the same command continues a stopped run.

The pipeline class comes from the folder's ``model_index.json`` (nothing is downloaded); the denoiser is its
``unet`` or ``transformer``. Example (a local diffusers folder, e.g. a saved ``stable-diffusion-v1-5`` pipeline)::

    python SD_setup/sd_generate.py --model /models/stable-diffusion-v1-5 --output_dir sd_generations \\
        --merge_fn_str atc --reduction_ratio 0.1 --merge_attn --linkage average
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from pathlib import Path

PROMPT_TEMPLATE = "A high quality photograph of a {}."
METADATA_FILE = "generation.json"
# Arguments that change the images: a folder generated with other values cannot be continued.
IMAGE_AFFECTING = (
    "model", "merge_fn_str", "reduction_ratio", "linkage", "max_downsample", "merge_attn", "merge_crossattn",
    "merge_mlp", "sx", "sy", "use_rand", "seed", "num_inference_steps", "guidance_scale", "use_full_precision",
    "height", "width", "prompt_template", "blocks", "plan", "group_size", "reuse_steps", "tile",
)
#: Text-to-image pipelines (``_class_name`` in model_index.json) whose denoiser the diffusers patch supports.
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline",
             "StableDiffusion3Pipeline", "FluxPipeline")


def build_parser() -> argparse.ArgumentParser:
    from atc.cluster import LINKAGES
    from atc.patch.diffusion import METHODS as DIFFUSERS_METHODS
    from atc.patch.diffusion import PLANS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="local diffusers pipeline folder (with model_index.json): a saved SD 1.5/2.1/SDXL, PixArt-α/Σ, "
                        "SD3/SD3.5 or Flux pipeline; the pipeline type is read from model_index.json, nothing is "
                        "downloaded")
    p.add_argument("--output_dir", default="sd_generations",
                   help="root folder; images go to <output_dir>/<experiment name>/")
    p.add_argument("--experiment_name", default=None,
                   help="subfolder name (default: derived from the merging settings, e.g. atc_average_r0.5_md1_attn)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--classes", nargs="+", default=None,
                   help="subset of ImageNet classes: indices, ranges (0-9), WordNet ids or names (default: all 1000)")
    p.add_argument("--merge_fn_str", default="none", choices=["none", *DIFFUSERS_METHODS],
                   help="token reduction: none, atc (agglomerative clustering) or tome (ToMe-SD)")
    p.add_argument("--reduction_ratio", type=float, default=0.5,
                   help="fraction of the tokens REMOVED in each reduced block (0.1 keeps 90%%)")
    p.add_argument("--linkage", default="average", choices=sorted(LINKAGES),
                   help="ATC linkage function")
    p.add_argument("--backend", default="auto", help="ATC clustering backend (auto, numba, torch, scipy, ...)")
    p.add_argument("--max_downsample", type=int, default=1,
                   help="UNets: reduce only in transformer blocks with latent downsampling <= this (1 = full "
                        "resolution; SDXL has no full-resolution transformers: use 2)")
    p.add_argument("--blocks", type=int, nargs="+", default=None,
                   help="indices of the transformer blocks to patch, in execution order (default: every block of a "
                        "diffusion transformer; every block within --max_downsample of a UNet)")
    p.add_argument("--merge_attn", action=argparse.BooleanOptionalAction, default=True,
                   help="merge tokens for self-attention (default on)")
    p.add_argument("--merge_crossattn", action=argparse.BooleanOptionalAction, default=False,
                   help="merge the cross-attention queries (default off)")
    p.add_argument("--merge_mlp", action=argparse.BooleanOptionalAction, default=False,
                   help="merge tokens for the MLP (default off)")
    p.add_argument("--plan", default="block", choices=list(PLANS),
                   help="merge plan: 'block' (every block plans for itself, as published) or 'group' (the first "
                        "block of a group plans for all: UNet one per resolution, transformers all blocks)")
    p.add_argument("--group_size", type=int, default=None,
                   help="with --plan group: blocks per group, in execution order (default: all at one resolution)")
    p.add_argument("--reuse_steps", type=int, default=1,
                   help="recompute the merge plans every K denoising steps and reuse them in between (default 1)")
    p.add_argument("--tile", type=int, nargs="+", default=None, metavar="H [W]",
                   help="ATC: cluster within tiles of H x W latent tokens (faster on large latents; default: none)")
    p.add_argument("--sx", type=int, default=2, help="ToMe-SD cell width (one destination token per cell)")
    p.add_argument("--sy", type=int, default=2, help="ToMe-SD cell height")
    p.add_argument("--use_rand", action=argparse.BooleanOptionalAction, default=True,
                   help="ToMe-SD: random destination token in each cell (default on; --no-use_rand = top-left)")
    p.add_argument("--img_per_class", type=int, default=2, help="images per class")
    p.add_argument("--seed", type=int, default=0, help="base seed; image j of class c uses seed + c*img_per_class + j")
    p.add_argument("--num_inference_steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="guidance scale (default: the pipeline's own, e.g. 7.5 for SD 1.5, 3.5 for Flux dev)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's, 512 for SD 1.5)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--use_full_precision", action="store_true",
                   help="float32 weights on GPU (default float16 on GPU; the CPU always uses float32)")
    p.add_argument("--prompt_template", default=PROMPT_TEMPLATE, help="prompt with {} for the class name")
    return p


def experiment_name(args: argparse.Namespace) -> str:
    """Folder name describing the merging settings, e.g. ``atc_average_r0.5_md1_attn``."""
    if args.experiment_name:
        return args.experiment_name
    if args.merge_fn_str == "none":
        return "none"
    ops = "-".join(n for n, on in (("attn", args.merge_attn), ("xattn", args.merge_crossattn),
                                   ("mlp", args.merge_mlp)) if on)
    parts = [args.merge_fn_str]
    if args.merge_fn_str == "atc":
        parts.append(args.linkage)
    parts.append(f"r{args.reduction_ratio:g}")
    if getattr(args, "is_unet", True):
        parts.append(f"md{args.max_downsample}")
    if args.blocks:
        parts.append("b" + "-".join(str(b) for b in args.blocks))
    parts.append(ops)
    if args.plan != "block":
        parts.append(args.plan + (str(args.group_size) if args.group_size else ""))
    if args.reuse_steps > 1:
        parts.append(f"k{args.reuse_steps}")
    if args.tile:
        parts.append(f"tile{args.tile[0]}x{args.tile[-1]}")
    if args.merge_fn_str == "tome":
        parts.append(f"sx{args.sx}sy{args.sy}" + ("rand" if args.use_rand else ""))
    return "_".join(parts)


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks with clear messages, before the model is loaded; sets ``args.is_unet``."""
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise SystemExit(
            f"--model {model}: not a diffusers pipeline folder (no model_index.json). Save one with "
            "`pipe.save_pretrained(PATH)` on a machine with the weights, or build a tiny test pipeline with "
            "`python SD_setup/tiny_pipeline.py --output PATH [--kind pixart|sd3|flux]`."
        )
    try:
        index = json.loads((model / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"--model {model}: model_index.json is not readable JSON ({err})") from None
    if index.get("_class_name") not in PIPELINES:
        raise SystemExit(f"--model {model}: a {index.get('_class_name')}; sd_generate.py runs the text-to-image "
                         f"pipelines {', '.join(PIPELINES)}")
    args.is_unet = "unet" in index
    # components saved as absent (e.g. SD3 without its T5 encoder) must be passed as None to load the pipeline
    args.absent_components = {k: None for k, v in index.items() if not k.startswith("_") and v == [None, None]}
    if args.guidance_scale is None:  # the pipeline's own default, recorded as the value used
        import diffusers

        param = inspect.signature(getattr(diffusers, index["_class_name"]).__call__).parameters.get("guidance_scale")
        args.guidance_scale = None if param is None else param.default
    for name in ("img_per_class", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(args, name)}")
    if "{}" not in args.prompt_template:
        raise SystemExit(f"--prompt_template must contain {{}} for the class name, got {args.prompt_template!r}")
    if args.merge_fn_str != "none":
        from atc.patch.diffusion import check_options

        if not (args.merge_attn or args.merge_crossattn or args.merge_mlp):
            raise SystemExit("token merging selected but nothing to merge: pass --merge_attn (and/or "
                             "--merge_crossattn, --merge_mlp)")
        try:
            check_options(args.merge_fn_str, args.reduction_ratio, args.max_downsample, args.sx, args.sy,
                          args.linkage, args.backend, args.device or "cpu", args.plan, args.group_size,
                          args.reuse_steps, tuple(args.tile) if args.tile else None)
        except (ValueError, TypeError) as err:
            raise SystemExit(f"invalid merging option: {err}") from None


def load_metadata(folder: Path, args: dict) -> dict:
    """The folder's ``generation.json`` (checked against ``args``), or a fresh one."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {"args": args, "durations": {}}
    meta = json.loads(path.read_text(encoding="utf-8"))
    old = meta.get("args", {})
    differ = [k for k in IMAGE_AFFECTING if k in old and old[k] != args.get(k)]
    if differ:
        details = ", ".join(f"{k}: {old[k]!r} -> {args.get(k)!r}" for k in differ)
        raise SystemExit(
            f"{folder} already holds images generated with other settings ({details}). Use another "
            "--output_dir or --experiment_name, or the original settings to continue that run."
        )
    meta["args"] = {**old, **args}
    meta.setdefault("durations", {})
    return meta


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    from atc.sd.imagenet_classes import select_classes

    try:
        classes = select_classes(args.classes)
    except ValueError as err:
        raise SystemExit(f"--classes: {err}") from None
    check_args(args)

    import torch
    from tqdm import tqdm

    from atc.utils import atomic_write_text

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise SystemExit(f"--device {args.device!r}: {err}") from None
    folder = Path(args.output_dir) / experiment_name(args)
    folder.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in vars(args).items() if k not in ("classes", "output_dir", "device", "is_unet",
                                                                     "absent_components")}
    record["model"] = str(Path(args.model).resolve())
    meta = load_metadata(folder, record)

    jobs = [(c, j) for c in classes for j in range(args.img_per_class)]
    todo = [(c, j) for c, j in jobs if not (folder / f"{c.index:04d}_{j}.png").is_file()
            or f"{c.index:04d}_{j}.png" not in meta["durations"]]
    print(f"{folder}: {len(jobs) - len(todo)} of {len(jobs)} images already there, {len(todo)} to generate")
    if not todo:
        return folder

    from diffusers import DiffusionPipeline

    dtype = torch.float16 if device.type == "cuda" and not args.use_full_precision else torch.float32
    import diffusers.pipelines.pipeline_utils as pipeline_utils

    # diffusers >= 0.36 names the argument `dtype` (and deprecates `torch_dtype`); older releases only know the latter.
    dtype_kw = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    try:
        pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True, **{dtype_kw: dtype},
                                                 **args.absent_components).to(device)
    except (OSError, ValueError, KeyError) as err:
        raise SystemExit(f"cannot load a diffusers pipeline from {args.model}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    if args.merge_fn_str != "none":
        import atc.patch
        from atc.patch.diffusion import reseed

        try:
            atc.patch.diffusers(
                pipe, method=args.merge_fn_str, ratio=args.reduction_ratio, max_downsample=args.max_downsample,
                merge_attn=args.merge_attn, merge_crossattn=args.merge_crossattn, merge_mlp=args.merge_mlp,
                sx=args.sx, sy=args.sy, use_rand=args.use_rand, linkage=args.linkage, backend=args.backend,
                blocks=args.blocks, plan=args.plan, group_size=args.group_size, reuse_steps=args.reuse_steps,
                tile=tuple(args.tile) if args.tile else None,
            )
        except (ValueError, TypeError) as err:
            raise SystemExit(f"invalid merging option for {type(pipe).__name__}: {err}") from None
    call_params = inspect.signature(pipe.__call__).parameters
    extra = {}
    if args.guidance_scale is not None:
        extra["guidance_scale"] = args.guidance_scale
    if "clean_caption" in call_params:  # PixArt: caption cleaning needs bs4/ftfy, which we do not install
        extra["clean_caption"] = False

    for c, j in tqdm(todo, desc=f"generating {folder.name}"):
        seed = args.seed + c.index * args.img_per_class + j
        if args.merge_fn_str != "none":
            reseed(pipe, seed)  # ToMe-SD's random destinations, reproducible per image
        generator = torch.Generator(device="cpu").manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        image = pipe(
            args.prompt_template.format(c.name), num_inference_steps=args.num_inference_steps,
            generator=generator, height=args.height, width=args.width, **extra,
        ).images[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        duration = time.perf_counter() - start
        name = f"{c.index:04d}_{j}.png"
        tmp = folder / f".{name}.tmp.png"
        image.save(tmp)
        tmp.replace(folder / name)  # atomic: a stopped run never leaves a half-written image
        meta["durations"][name] = duration
        atomic_write_text(json.dumps(meta, indent=1, sort_keys=True), folder / METADATA_FILE)

    durations = list(meta["durations"].values())
    mean = sum(durations) / len(durations)
    std = math.sqrt(sum((d - mean) ** 2 for d in durations) / len(durations))
    print(f"done: {len(durations)} images in {folder}, {mean:.3f} ± {std:.3f} s per image")
    return folder


if __name__ == "__main__":
    main()
