"""What the diffusion experiments (``SD_setup/``) use besides the patch itself (:mod:`atc.patch.diffusion`) and FID
(:mod:`atc.fid`):

- :mod:`atc.sd.imagenet_classes`: the 1000 ImageNet classes with short readable names for the prompts, and
  ``select_classes`` for ``--classes`` (indices, ranges, WordNet ids, names);
- :mod:`atc.sd.denoisers`: UNets and diffusion transformers with random weights from named configs (real shapes
  and tiny ones) and random inputs for them, for the step-time benchmark and the tests;
- :mod:`atc.sd.tiny_pipeline`: tiny random SD-1.x / SDXL / PixArt / SD3 / Flux pipelines built offline, for smoke
  runs and tests;
- :mod:`atc.sd.digits_diffusion`: a small class-conditional diffusion model trained on the bundled digits, its
  sampler and the download-free quality metrics of ``reproduce_digits_generation.py``.

Submodules are imported on use, so ``import atc.sd`` needs neither diffusers nor transformers.
"""
