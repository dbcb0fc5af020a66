"""The diffusers patch's former module name, kept so that existing imports keep working: everything lives in
:mod:`atc.patch.diffusion` (UNets and diffusion transformers)."""

from atc.patch.diffusion import (  # noqa: F401
    METHODS,
    SUPPORTED_MODELS,
    apply_patch,
    check_options,
    find_denoiser,
    merge_info,
    remove_patch,
    reseed,
    sd_destination_index,
    sd_destination_mask,
    token_grid_downsample,
)
