"""Save a tiny randomly initialised diffusion pipeline (offline; for smoke runs of sd_generate.py).

    python SD_setup/tiny_pipeline.py --output /tmp/tiny-sd                  # SD-1.x shaped
    python SD_setup/tiny_pipeline.py --output /tmp/tiny-sdxl --kind sdxl    # SDXL shaped (two text encoders)
    python SD_setup/tiny_pipeline.py --output /tmp/tiny-pixart --kind pixart   # also: sd3, sd35, flux

The folder loads like a real checkpoint (``sd_generate.py --model /tmp/tiny-sd``) but its images are noise. The
pipeline is built by :func:`atc.sd.tiny_pipeline.build_tiny_pipeline`.
"""

from __future__ import annotations

import argparse

from atc.sd.tiny_pipeline import PIPELINE_KINDS, build_tiny_pipeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder to write the diffusers pipeline to")
    p.add_argument("--kind", default="sd15", choices=PIPELINE_KINDS,
                   help="pipeline: sd15 (StableDiffusionPipeline), sdxl, pixart (PixArtAlphaPipeline), sd3 / sd35 "
                        "(StableDiffusion3Pipeline; sd35 with SD3.5's dual-attention blocks), flux (FluxPipeline)")
    p.add_argument("--sdxl", action="store_true", help="same as --kind sdxl")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    kind = "sdxl" if args.sdxl else args.kind
    build_tiny_pipeline(kind, args.seed).save_pretrained(args.output)
    print(f"saved a tiny random {kind} pipeline to {args.output}")


if __name__ == "__main__":
    main()
