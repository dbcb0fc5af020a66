"""Reading the mmdet-style detection configs, shared by every ``MMDet_setup/`` script.

    from atc.detection.config import load_config
    cfg = load_config("MMDet_setup/configs/mask_rcnn/vit-adapter-t-3x.py", {"model.backbone.linkage": "single"})

``options`` is what mmengine's ``DictAction`` makes of ``--cfg-options key=value ...``. Every problem (a missing
or broken file, a top-level key neither the config nor :mod:`atc.detection.engine` knows, an override that cannot
be applied, ``--launcher pytorch`` outside torchrun) is an :class:`atc.cli.ConfigError` naming the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from atc.cli import ConfigError

__all__ = ["ENGINE_KEYS", "LAUNCHERS", "load_config", "check_launcher"]

# Top-level keys the engine reads besides those of the config files, so a typo in --cfg-options is caught
# instead of silently adding a key nothing reads.
ENGINE_KEYS = frozenset({"auto_resume", "resume_from", "load_from", "fp16", "amp", "device", "seed",
                         "cumulative_iters", "work_dir", "data_root"})

# --launcher choices: "pytorch" = started by torchrun (DDP), "none" = one process.
LAUNCHERS = ("none", "pytorch")


def load_config(path: str | os.PathLike, options: dict[str, Any] | None = None,
                work_dir: str | os.PathLike | None = None) -> Any:
    """The mmengine ``Config`` read from ``path`` with ``options`` (dotted keys -> values) merged in, and
    ``work_dir`` set when given. Raises :class:`ConfigError` for a missing or unreadable file, unknown top-level
    keys in ``options`` (typos) and overrides that cannot be applied."""
    from mmengine.config import Config

    if not Path(path).is_file():
        raise ConfigError(f"config file '{path}' not found (configs live in MMDet_setup/configs/mask_rcnn/)")
    try:
        cfg = Config.fromfile(str(path))
    except Exception as exc:  # noqa: BLE001 - syntax errors, missing _base_ files...
        raise ConfigError(f"cannot read config '{path}': {exc}") from exc
    options = dict(options or {})
    known = set(cfg.keys()) | ENGINE_KEYS
    unknown = sorted({k.split(".")[0] for k in options} - known)
    if unknown:
        raise ConfigError(f"--cfg-options: unknown config key(s) {unknown} (top-level keys: "
                          f"{', '.join(sorted(known))})")
    if options:
        try:
            cfg.merge_from_dict(options)
        except Exception as exc:  # noqa: BLE001 - e.g. indexing into a non-dict value
            raise ConfigError(f"--cfg-options could not be applied: {exc}") from exc
    if work_dir:
        cfg.work_dir = str(work_dir)
    return cfg


def check_launcher(launcher: str) -> None:
    """Raise :class:`ConfigError` when ``--launcher pytorch`` is used outside torchrun (no ``RANK`` set)."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if launcher == "pytorch" and "RANK" not in os.environ:
        raise ConfigError("--launcher pytorch needs torchrun (RANK/WORLD_SIZE unset); use --launcher none")
