"""Denoiser time per step with and without token merging, and what merging changes (random weights, any device).

The denoiser (a UNet or a diffusion transformer) is built with random weights from a named config
(``atc.sd.denoisers.CONFIGS``: ``sd15``, ``sd15-half``, ``pixart-512``, ``pixart-1024``, ``dit-xl-256``,
``sd3-medium``, ``sd35-medium``, ``flux-dev``, ``*-tiny``) or a ``config.json``. A short denoising trajectory of
``--steps`` steps is made once with the unpatched model (decreasing timesteps, Euler updates with its output);
every setting (method, ratio, plan, reuse, tile) is then run on the same inputs, step by step, and the script
reports per setting:
the time per step (median over ``--runs`` rounds of the trajectory's mean), its ratio to the unpatched step in
the same run, the merges (clusterings or matchings) computed per step, and a quality proxy that needs no real
weights: the relative error of the output against the unpatched output on the same input, ``||e - e0|| / ||e0||``,
averaged over the trajectory. ``--plan``, ``--reuse_steps`` and ``--tile`` take several values, one setting each.
Settings are interleaved round by round, so a change in machine load hits all of them alike. Writes a CSV and a plot (time ratio against relative error) to ``--output_dir``.

    python SD_setup/benchmark_diffusion.py --config sd15 --latent_size 64 --methods none tome atc --ratios 0.5
    python SD_setup/benchmark_diffusion.py --config pixart-512 --depth 4 --methods none tome atc   # 1024 tokens
    python SD_setup/benchmark_diffusion.py --config flux-dev --depth 3 --latent_size 128          # 4096 + 512
    python SD_setup/benchmark_diffusion.py --config sd15-half --methods none tome atc --plan block group \
        --tile none 16x16 --reuse_steps 1 5                          # what shared plans and tiles trade

On a GPU, in half precision (as diffusion models are run there; ``--backend auto`` picks the GPU clustering):

    python SD_setup/benchmark_diffusion.py --config sd15 --device cuda --dtype float16 --methods none tome atc
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

DTYPES = {"float32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def build_parser() -> argparse.ArgumentParser:
    from atc.cluster import LINKAGES
    from atc.patch.diffusion import METHODS as DIFFUSION_METHODS
    from atc.patch.diffusion import PLANS
    from atc.sd.denoisers import CONFIGS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd15",
                   help=f"denoiser config: one of {sorted(CONFIGS)} or a path to a diffusers config.json / model "
                        "folder (UNet2DConditionModel, PixArt, DiT, SD3 or Flux transformer)")
    p.add_argument("--depth", type=int, default=None,
                   help="diffusion transformers: keep only the first DEPTH blocks (a realistic width and token "
                        "count at a cost a CPU can time); default: all")
    p.add_argument("--latent_size", type=int, nargs="+", default=None,
                   help="VAE latent height [and width] (default: the config's sample_size; 64 = 512px SD-1.x). "
                        "Image tokens: UNet H*W at full resolution, PixArt/DiT/SD3 (H/2)*(W/2), Flux (H/2)*(W/2)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="denoiser batch (default 2 = one image with classifier-free guidance; Flux: 1, as its "
                        "guidance-distilled models run)")
    p.add_argument("--text_tokens", type=int, default=None,
                   help="length of the text embeddings (default: the family's pipeline's: UNet 77, PixArt 120, "
                        "SD3 333, Flux 512)")
    p.add_argument("--methods", nargs="+", default=["none", "tome", "atc"], choices=["none", *DIFFUSION_METHODS],
                   help="reduction methods to time")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5], help="fractions of image tokens removed")
    p.add_argument("--max_downsample", type=int, default=1, help="UNets: reduce only where downsampling <= this")
    p.add_argument("--blocks", type=int, nargs="+", default=None,
                   help="indices of the transformer blocks to patch (default: all of a diffusion transformer)")
    p.add_argument("--merge_attn", action=argparse.BooleanOptionalAction, default=True,
                   help="merge the tokens of self-/joint attention (default on)")
    p.add_argument("--merge_crossattn", action=argparse.BooleanOptionalAction, default=False,
                   help="merge cross-attention queries (UNet, PixArt; default off)")
    p.add_argument("--merge_mlp", action=argparse.BooleanOptionalAction, default=False,
                   help="merge the tokens of the MLP (default off)")
    p.add_argument("--plan", nargs="+", default=["block"], choices=list(PLANS),
                   help="merge plans to time: 'block' (every block its own) and/or 'group' (one per group of blocks)")
    p.add_argument("--group_size", type=int, default=None,
                   help="with --plan group: blocks per group (default: all blocks at one token count)")
    p.add_argument("--reuse_steps", type=int, nargs="+", default=[1],
                   help="recompute the plans every K denoising steps (several values: one setting each)")
    p.add_argument("--tile", nargs="+", default=["none"],
                   help="ATC tiles of the token grid, 'none' or HxW (or H for a square), e.g. --tile none 16x16")
    p.add_argument("--linkage", default="average", choices=sorted(LINKAGES), help="ATC linkage")
    p.add_argument("--backend", default="auto",
                   help="ATC clustering backend: 'auto' (the best one for --device) or a name from "
                        "atc.cluster.available_backends()")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="weights and inputs dtype (float16 as diffusion models usually run on a GPU)")
    p.add_argument("--steps", type=int, default=3, help="denoising steps per trajectory (timed, each a forward)")
    p.add_argument("--runs", type=int, default=3, help="timed rounds over all settings")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--output_dir", default="results/sd_benchmark", help="where to write the CSV and the plot")
    return p


def parse_tile(text: str) -> tuple[int, int] | None:
    """``none``, ``16`` or ``16x8`` -> ``None``, ``(16, 16)``, ``(16, 8)``."""
    if text.lower() == "none":
        return None
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise SystemExit(f"--tile {text!r}: give 'none', a size such as 16, or HxW such as 16x8")
    return parts[0], parts[-1]


def _setting_label(s: dict, linkage: str) -> str:
    if s["method"] == "none":
        return "none"
    label = f"{s['method']}{'-' + linkage if s['method'] == 'atc' else ''} r{s['ratio']:g}"
    if s["plan"] != "block":
        label += f" {s['plan']}"
    if s["reuse_steps"] > 1:
        label += f" k{s['reuse_steps']}"
    if s["tile"]:
        label += f" tile{s['tile'][0]}x{s['tile'][1]}"
    return label


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.steps < 1:
        raise SystemExit("--runs and --steps must be >= 1 and --warmup >= 0")
    import torch
    from tqdm import tqdm

    import atc.patch
    from atc.cluster import resolve_backend
    from atc.patch.diffusion import check_options, merge_info, reseed
    from atc.sd.denoisers import build_denoiser, load_config, random_inputs, token_grid
    from atc.utils import labeled_scatter, write_csv

    try:
        family, config = load_config(args.config)
        torch.device(args.device)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"--config/--device: {err}") from None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available here: use --device cpu")
    if args.depth is not None and family == "unet":
        raise SystemExit("--depth applies to diffusion transformers, not to a UNet config")
    tiles = [parse_tile(t) for t in args.tile]
    settings = [dict(method="none", ratio=0.0, plan="block", reuse_steps=1, tile=None)] if "none" in args.methods else []
    settings += [dict(method=m, ratio=r, plan=plan, reuse_steps=k, tile=tile)
                 for m in args.methods if m != "none" for r in args.ratios for plan in args.plan
                 for k in args.reuse_steps for tile in tiles if tile is None or m == "atc"]
    for s in settings[1 if "none" in args.methods else 0:]:
        try:
            check_options(s["method"], s["ratio"], args.max_downsample, linkage=args.linkage, backend=args.backend,
                          device=args.device, plan=s["plan"], reuse_steps=s["reuse_steps"], tile=s["tile"],
                          group_size=args.group_size if s["plan"] == "group" else None)
        except (ValueError, TypeError) as err:
            raise SystemExit(str(err)) from None
    backend = resolve_backend(args.backend, args.device) if "atc" in args.methods else ""
    dtype = getattr(torch, DTYPES[args.dtype])
    if args.threads:
        torch.set_num_threads(args.threads)
    latent = args.latent_size or [config.get("sample_size", 64) if family != "flux" else 128]
    latent_h, latent_w = latent[0], latent[-1]
    batch = args.batch_size or (1 if family == "flux" else 2)
    model = build_denoiser(args.config, depth=args.depth, dtype=dtype, device=args.device)
    params = sum(p.numel() for p in model.parameters())
    grid = token_grid(model, latent_h, latent_w) if family != "unet" else (latent_h, latent_w)
    x_key = "sample" if family == "unet" else "hidden_states"

    # One trajectory of the unpatched model: inputs x_k at decreasing timesteps and the outputs e0_k there.
    timesteps = torch.linspace(999, 1, args.steps).tolist()
    trajectory, reference = [], []
    with torch.inference_mode():
        inputs = random_inputs(model, grid, batch, args.text_tokens, timestep=timesteps[0])
        for k, t in enumerate(timesteps):
            step_inputs = {**random_inputs(model, grid, batch, args.text_tokens, timestep=t), x_key: inputs[x_key]}
            eps = model(**step_inputs).sample
            trajectory.append(step_inputs)
            reference.append(eps)
            x = step_inputs[x_key]
            dt = (t - (timesteps[k + 1] if k + 1 < len(timesteps) else 0.0)) / 1000
            inputs = {x_key: x - dt * eps[:, : x.shape[1]] if x.dim() == 4 else x - dt * eps}

    def configure(s: dict) -> None:
        atc.patch.remove(model)
        if s["method"] != "none":
            try:
                atc.patch.diffusers(model, method=s["method"], ratio=s["ratio"], max_downsample=args.max_downsample,
                                    merge_attn=args.merge_attn, merge_crossattn=args.merge_crossattn,
                                    merge_mlp=args.merge_mlp, linkage=args.linkage, backend=args.backend,
                                    blocks=args.blocks, plan=s["plan"], reuse_steps=s["reuse_steps"], tile=s["tile"],
                                    group_size=args.group_size if s["plan"] == "group" else None)
            except (ValueError, TypeError) as err:
                raise SystemExit(f"cannot patch {type(model).__name__}: {err}") from None
            reseed(model, 0)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    labels = [_setting_label(s, args.linkage) for s in settings]
    times: dict[str, list[float]] = {label: [] for label in labels}
    errors: dict[str, float] = {}
    plans: dict[str, float] = {}
    tokens: dict[str, dict] = {}
    with torch.inference_mode():
        for i in tqdm(range(args.warmup + args.runs), desc="rounds"):
            for setting, label in zip(settings, labels):
                configure(setting)
                elapsed, errs = 0.0, []
                for step_inputs, eps0 in zip(trajectory, reference):
                    sync()
                    start = time.perf_counter()
                    eps = model(**step_inputs).sample
                    sync()
                    elapsed += time.perf_counter() - start
                    errs.append(float((eps.float() - eps0.float()).norm() / eps0.float().norm()))
                if i >= args.warmup:
                    times[label].append(elapsed / len(trajectory))
                errors[label] = statistics.mean(errs)
                if setting["method"] != "none":
                    info = merge_info(model)
                    plans[label] = info["plans"] / len(trajectory)
                    tokens[label] = info["tokens"]
    atc.patch.remove(model)
    rows = []
    for s, label in zip(settings, labels):
        ts, method = times[label], s["method"]
        merged = tokens.get(label, {})
        row = {"config": Path(str(args.config)).name, "family": family, "depth": args.depth or "",
               "params_M": round(params / 1e6, 1), "latent_size": f"{latent_h}x{latent_w}",
               "image_tokens": grid[0] * grid[1], "batch_size": batch, "method": method,
               "reduction_ratio": s["ratio"], "setting": label, "plan": s["plan"],
               "group_size": (args.group_size or "") if s["plan"] == "group" else "", "reuse_steps": s["reuse_steps"],
               "tile": f"{s['tile'][0]}x{s['tile'][1]}" if s["tile"] else "",
               "linkage": args.linkage if method == "atc" else "", "max_downsample": args.max_downsample,
               "backend": backend if method == "atc" else "", "dtype": DTYPES[args.dtype], "device": args.device,
               "steps": len(trajectory), "step_time_median_s": statistics.median(ts),
               "step_time_mean_s": statistics.mean(ts), "step_time_std_s": statistics.pstdev(ts), "runs": len(ts),
               "plans_per_step": plans.get(label, 0.0), "merged_blocks": len(merged),
               "tokens_per_block": " ".join(f"{i}:{n}->{k}" for i, (n, k) in sorted(merged.items())),
               "rel_error": errors[label]}
        rows.append(row)
    base = next((r["step_time_median_s"] for r in rows if r["method"] == "none"), None)
    for r in rows:
        r["time_vs_none"] = r["step_time_median_s"] / base if base else None
        r["speedup_vs_none"] = base / r["step_time_median_s"] if base else None
    print(f"{args.config}: {params / 1e6:.0f}M parameters, {grid[0] * grid[1]} image tokens, batch {batch}, "
          f"{DTYPES[args.dtype]} on {args.device}")
    width = max(len(r["setting"]) for r in rows)
    for r in rows:
        ratio = f"{r['time_vs_none']:.2f}x of none" if base else ""
        print(f"{r['setting']:{width}s} {r['step_time_median_s']:.3f} s/step {ratio:>16s}  rel. error "
              f"{r['rel_error']:.4f}  merges/step {r['plans_per_step']:.1f}")
    stem = f"step_time_{Path(str(args.config)).name}_{latent_h}x{latent_w}" + (f"_d{args.depth}" if args.depth else "")
    out = write_csv(rows, Path(args.output_dir) / f"{stem}.csv")
    if base:
        labeled_scatter(rows, "time_vs_none", "rel_error", "setting", Path(args.output_dir) / f"{stem}.png",
                        title=f"{args.config}: {grid[0] * grid[1]} image tokens, batch {batch}",
                        xlabel="step time / unpatched step", ylabel="relative error of the output vs unpatched")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
