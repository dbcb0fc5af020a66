"""UNet time per denoising step with and without token merging (random weights, any device).

One step = one UNet forward on a batch of 2 (classifier-free guidance) at the given latent size (64 = 512px
SD-1.x images). The UNet is built from a config with random weights: ``sd15`` is the real Stable Diffusion
1.x UNet shape (860M parameters), ``sd15-half`` the same layout at half width (for slow machines), ``tiny``
a test-sized one, or a path to a UNet ``config.json`` / diffusers UNet folder.

    python SD_setup/benchmark_unet.py --config sd15 --latent_size 64 --methods none tome atc --ratios 0.5

On a GPU, in half precision (as SD is run there; the clustering backend ``auto`` picks the GPU backend):

    python SD_setup/benchmark_unet.py --config sd15 --device cuda --dtype float16 --methods none tome atc
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
DTYPES = {"float32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
CONFIGS = {
    "sd15": SD15,
    "sd15-half": {**SD15, "block_out_channels": (160, 320, 640, 640)},
    "tiny": {**SD15, "block_out_channels": (32, 64, 64, 64), "layers_per_block": 1, "cross_attention_dim": 32,
             "norm_num_groups": 16},
}


def build_parser() -> argparse.ArgumentParser:
    from atc.cluster import LINKAGES
    from atc.patch.diffusers_unet import METHODS as DIFFUSERS_METHODS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd15",
                   help=f"UNet config: one of {list(CONFIGS)} or a path to a config.json / UNet folder")
    p.add_argument("--latent_size", type=int, default=64, help="latent height and width (64 = 512px images)")
    p.add_argument("--batch_size", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    p.add_argument("--methods", nargs="+", default=["none", "tome", "atc"], choices=["none", *DIFFUSERS_METHODS],
                   help="reduction methods to time")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5], help="fractions of tokens removed")
    p.add_argument("--max_downsample", type=int, default=1, help="reduce only where downsampling <= this")
    p.add_argument("--linkage", default="average", choices=sorted(LINKAGES), help="ATC linkage")
    p.add_argument("--backend", default="auto",
                   help="ATC clustering backend: 'auto' (the best one for --device) or a name from "
                        "atc.cluster.available_backends()")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="UNet weights and inputs dtype (float16 as SD is usually run on a GPU)")
    p.add_argument("--runs", type=int, default=3, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--output_dir", default="results/sd_benchmark", help="where to write CSV and PNG")
    return p


def load_config(name: str) -> dict:
    if name in CONFIGS:
        return dict(CONFIGS[name])
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SystemExit(f"--config {name}: not one of {list(CONFIGS)} and no such config file")
    config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        raise SystemExit("--runs must be >= 1 and --warmup >= 0")
    config = load_config(args.config)
    import torch
    from diffusers import UNet2DConditionModel
    from tqdm import tqdm

    import atc.patch
    from atc.cluster import resolve_backend
    from atc.patch.diffusers_unet import check_options
    from atc.utils import write_csv

    try:
        torch.device(args.device)
    except RuntimeError as err:
        raise SystemExit(f"--device: {err}") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available here: use --device cpu")
    for method in args.methods:
        for ratio in args.ratios:
            if method != "none":
                try:
                    check_options(method, ratio, args.max_downsample, linkage=args.linkage, backend=args.backend,
                                  device=args.device)
                except ValueError as err:
                    raise SystemExit(str(err)) from None
    backend = resolve_backend(args.backend, args.device) if "atc" in args.methods else ""
    dtype = getattr(torch, DTYPES[args.dtype])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).to(args.device, dtype).eval()
    params = sum(p.numel() for p in unet.parameters())
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch_size, unet.config.in_channels, args.latent_size, args.latent_size, generator=gen)
    text = torch.randn(args.batch_size, 77, unet.config.cross_attention_dim, generator=gen)
    sample, text = sample.to(args.device, dtype), text.to(args.device, dtype)
    settings = [("none", 0.0)] if "none" in args.methods else []
    settings += [(m, r) for m in args.methods if m != "none" for r in args.ratios]
    def configure(method: str, ratio: float) -> None:
        atc.patch.remove(unet)
        if method != "none":
            atc.patch.diffusers(unet, method=method, ratio=ratio, max_downsample=args.max_downsample,
                                linkage=args.linkage, backend=args.backend)

    def step() -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        unet(sample, torch.tensor(500, device=args.device), text)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # Settings are interleaved run by run, so a change in machine load hits all of them alike.
    times: dict[tuple[str, float], list[float]] = {s: [] for s in settings}
    with torch.inference_mode():
        for i in tqdm(range(args.warmup + args.runs), desc="rounds"):
            for method, ratio in settings:
                configure(method, ratio)
                elapsed = step()
                if i >= args.warmup:
                    times[(method, ratio)].append(elapsed)
    atc.patch.remove(unet)
    rows = []
    for (method, ratio), ts in times.items():
        row = {"config": args.config, "params_M": round(params / 1e6, 1), "latent_size": args.latent_size,
               "batch_size": args.batch_size, "method": method, "reduction_ratio": ratio,
               "linkage": args.linkage if method == "atc" else "", "max_downsample": args.max_downsample,
               "backend": backend if method == "atc" else "", "dtype": DTYPES[args.dtype], "device": args.device,
               "step_time_median_s": statistics.median(ts), "step_time_mean_s": statistics.mean(ts),
               "step_time_std_s": statistics.pstdev(ts), "runs": len(ts)}
        rows.append(row)
        print(f"{method:5s} ratio {ratio:.2f}: median {row['step_time_median_s']:.3f} s/step "
              f"(mean {row['step_time_mean_s']:.3f} ± {row['step_time_std_s']:.3f}, {len(ts)} runs)")
    base = next((r["step_time_median_s"] for r in rows if r["method"] == "none"), None)
    for r in rows:
        r["speedup_vs_none"] = base / r["step_time_median_s"] if base else None
    out = Path(args.output_dir) / f"unet_step_time_{Path(args.config).name}_{args.latent_size}.csv"
    write_csv(rows, out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
