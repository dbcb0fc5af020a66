"""Per-epoch logs of the training loops (:class:`EpochLogger`: ``log.csv``/``log.jsonl`` always) and their
optional Weights & Biases tracking.

What it guarantees, so that a long run never depends on it:

- **No network needed.** Runs are offline unless ``WANDB_MODE`` says otherwise (``online``, ``disabled``...);
  offline runs are written under ``WANDB_DIR`` if set, else under the output folder (``<output_dir>/wandb/``),
  and uploaded later with ``wandb sync``.
- **One run per training run.** The run id is kept in the checkpoints and in ``<output_dir>/wandb_run.json``;
  a resumed training continues the same W&B run (same id, steps = epochs), so ``--resume`` after a crash never
  creates a duplicate.
- **Never fatal.** Any failure of wandb (bad project name, full disk, an error in ``wandb.init``) is reported
  once, as one ``warning: ...`` line on stderr; tracking is then off and training goes on with its CSV/JSONL
  logs.
- **Main process only** under DDP, and ``wandb`` is imported only when a project is given.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from atc import distributed as D

__all__ = ["EpochLogger", "WandbRun", "add_wandb_arguments", "require_wandb", "wandb_mode", "history_key",
           "read_run_id", "write_run_id", "RUN_ID_FILE"]

#: File in the output folder that remembers the W&B run id of the training run kept there.
RUN_ID_FILE = "wandb_run.json"

# Log columns ``<prefix>_<name>`` become W&B keys ``<prefix>/<name>`` (one panel section per prefix).
_SECTIONS = ("train", "val", "ema", "best")


def add_wandb_arguments(parser: Any) -> None:
    """The ``--wandb_project/--wandb_group/--wandb_name`` flags (same names and help in every training script)."""
    parser.add_argument("--wandb_project", default=None,
                        help="log the run to this Weights & Biases project: offline, in wandb/ of the output "
                             "folder (or WANDB_DIR), unless WANDB_MODE=online; WANDB_MODE=disabled turns it off")
    parser.add_argument("--wandb_group", default=None, help="W&B group of the run (e.g. one per table row)")
    parser.add_argument("--wandb_name", default=None,
                        help="W&B run name (default: the output folder's name); a resumed run keeps its W&B run")


def wandb_mode() -> str:
    """The W&B mode to run in: ``WANDB_MODE`` if set (``WANDB_DISABLED=true`` means ``disabled``), else
    ``offline``."""
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    return os.environ.get("WANDB_MODE") or "offline"


def require_wandb(project: str | None) -> None:
    """Raise :class:`atc.cli.ConfigError` naming the fix if ``--wandb_project`` is given but the wandb package
    is missing (checked before any heavy work; nothing is imported)."""
    import importlib.util

    if not project or wandb_mode() == "disabled" or importlib.util.find_spec("wandb") is not None:
        return
    from atc.cli import ConfigError

    raise ConfigError("--wandb_project needs the wandb package: `.venv/bin/pip install -c requirements/constraints.txt "
                      "-r requirements/base.txt` (or drop --wandb_project; log.csv/log.jsonl are always written).")


def history_key(column: str) -> str:
    """W&B key of a log column: ``val_top1 -> val/top1``, ``train_loss -> train/loss``, ``lr -> train/lr``."""
    if column == "lr":
        return "train/lr"
    head, sep, tail = column.partition("_")
    return f"{head}/{tail}" if sep and head in _SECTIONS else column


def read_run_id(folder: str | os.PathLike | None) -> str | None:
    """The run id stored in ``folder`` by :func:`write_run_id`, or None."""
    if folder is None:
        return None
    try:
        return str(json.loads((Path(folder) / RUN_ID_FILE).read_text())["run_id"]) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_run_id(folder: str | os.PathLike, run_id: str, project: str) -> None:
    from atc.utils import atomic_write_text

    atomic_write_text(json.dumps({"run_id": run_id, "project": project}) + "\n", Path(folder) / RUN_ID_FILE)


def _plain(value: Any) -> Any:
    """JSON-safe copy of a config (paths, tuples, numpy scalars... become JSON types or strings)."""
    return json.loads(json.dumps(value, default=str))


class WandbRun:
    """One W&B run of a training run. Every method is a no-op when tracking is off (no project, not the main
    process, ``WANDB_MODE=disabled``, or after a failure).

    ``run_id``: the id to continue (from a checkpoint or :func:`read_run_id`); a new one is made if None.
    ``folder``: the output folder; the run id is stored there (:func:`write_run_id`), and the offline run goes
    to ``folder/wandb/`` unless ``WANDB_DIR`` is set.
    """

    def __init__(self, project: str | None, *, group: str | None = None, name: str | None = None,
                 config: Mapping[str, Any] | None = None, folder: str | os.PathLike | None = None,
                 run_id: str | None = None) -> None:
        self.run: Any = None
        #: the run's id once started; kept after a failure so that checkpoints still name the run
        self.id: str | None = None
        self.failed = False
        mode = wandb_mode()
        if not project or mode == "disabled" or not D.is_main_process():
            return
        try:
            import wandb

            directory = os.environ.get("WANDB_DIR") or (str(folder) if folder is not None else None)
            if directory:
                Path(directory).mkdir(parents=True, exist_ok=True)
            # resume="allow": continue the run if W&B knows this id, create it otherwise. Without an id, wandb
            # makes a new one (resume="allow" alone would pick up whichever run last used the same folder).
            continued = {"id": run_id, "resume": "allow"} if run_id else {}
            self.run = wandb.init(project=project, group=group, name=name, config=_plain(dict(config or {})),
                                  dir=directory, mode=mode, **continued)
            self.id = self.run.id
            if folder is not None:
                write_run_id(folder, self.id, project)
        except Exception as exc:  # noqa: BLE001 - whatever wandb raises, training goes on
            self._fail(f"could not start the W&B run (project {project!r}, mode {mode!r})", exc)

    @property
    def active(self) -> bool:
        return self.run is not None

    def _fail(self, what: str, exc: BaseException) -> None:
        run, self.run = self.run, None
        if not self.failed:
            self.failed = True
            reason = " ".join(str(exc).split())  # one line, whatever wandb's message looks like
            print(f"warning: {what}: {type(exc).__name__}: {reason}. Weights & Biases logging is off for the rest "
                  "of this run; training continues and log.csv/log.jsonl are still written.", file=sys.stderr,
                  flush=True)
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already reported
                pass

    def _guarded(self, what: str, action: Callable[[Any], object]) -> None:
        """``action(run)`` on the live run; nothing when tracking is off, and a failure turns tracking off."""
        if self.run is None:
            return
        try:
            action(self.run)
        except Exception as exc:  # noqa: BLE001 - whatever wandb raises, training goes on
            self._fail(what, exc)

    def log(self, row: Mapping[str, Any], step: int | None = None) -> None:
        """Log one row of metrics (keys renamed by :func:`history_key`) at ``step`` (the epoch)."""
        self._guarded("could not log to the W&B run",
                      lambda run: run.log({history_key(k): v for k, v in row.items()}, step=step))

    def summary(self, values: Mapping[str, Any]) -> None:
        """Set run-summary values (e.g. the best checkpoint's metrics)."""
        self._guarded("could not update the W&B run summary", lambda run: run.summary.update(_plain(dict(values))))

    def update_config(self, values: Mapping[str, Any]) -> None:
        """Add values known only after start (token counts, FLOPs) to the run config."""
        self._guarded("could not update the W&B run config",
                      lambda run: run.config.update(_plain(dict(values)), allow_val_change=True))

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (``exit_code`` != 0 marks it failed)."""
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            self._fail("could not finish the W&B run", exc)


class EpochLogger:
    """Per-epoch rows to ``log.csv`` and ``log.jsonl`` in ``output_dir`` (always), and to Weights & Biases when
    a project is given (:mod:`atc.tracking`: offline unless ``WANDB_MODE`` says otherwise; a wandb failure is
    reported once and never stops training).

    ``run_id`` continues that W&B run (the id stored in the checkpoint being resumed). Without it, the id kept in
    ``output_dir`` is continued when resuming (``start_epoch > 0``) or when no epoch was logged yet (a run
    killed in its first epoch); otherwise a new W&B run starts.
    """

    def __init__(self, output_dir: str | os.PathLike | None, *, start_epoch: int = 0, wandb_project: str | None = None,
                 wandb_group: str | None = None, config: dict[str, Any] | None = None,
                 run_name: str | None = None, run_id: str | None = None) -> None:
        self.dir = Path(output_dir) if output_dir else None
        self.rows: list[dict[str, Any]] = []
        self.tracker: WandbRun | None = None
        if not D.is_main_process():
            return
        logged_before = False
        if self.dir is not None and (self.dir / "log.jsonl").is_file():
            # Keep the rows of finished epochs from the run being resumed; a killed epoch is redone.
            for line in (self.dir / "log.jsonl").read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    logged_before = True
                    if row.get("epoch", -1) < start_epoch:
                        self.rows.append(row)
        if wandb_project:
            if run_id is None and (start_epoch > 0 or not logged_before):
                run_id = read_run_id(self.dir)
            name = run_name or (self.dir.resolve().name if self.dir is not None else None)
            self.tracker = WandbRun(wandb_project, group=wandb_group, name=name, config=config, folder=self.dir,
                                    run_id=run_id)

    @property
    def tracking(self) -> bool:
        """Whether rows also go to a W&B run."""
        return self.tracker is not None and self.tracker.active

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run's id (stored in checkpoints so that a resumed training continues the run), or None."""
        return self.tracker.id if self.tracker is not None else None

    def log(self, row: dict[str, Any]) -> None:
        if not D.is_main_process():
            return
        self.rows.append(row)
        if self.dir is not None:
            from atc.utils import atomic_write_text, write_csv

            atomic_write_text("".join(json.dumps(r) + "\n" for r in self.rows), self.dir / "log.jsonl")
            write_csv(self.rows, self.dir / "log.csv")
        if self.tracker is not None:
            self.tracker.log(row, step=row.get("epoch"))

    def summary(self, values: dict[str, Any]) -> None:
        """Run-summary values of the W&B run (e.g. the best checkpoint's metrics); nothing without one."""
        if self.tracker is not None:
            self.tracker.summary(values)

    def update_config(self, values: dict[str, Any]) -> None:
        """Add values to the W&B run's config; nothing without one."""
        if self.tracker is not None:
            self.tracker.update_config(values)

    def finish(self, exit_code: int = 0) -> None:
        """Close the W&B run, if any (``exit_code`` != 0 marks it failed)."""
        if self.tracker is not None:
            self.tracker.finish(exit_code)

    def __enter__(self) -> "EpochLogger":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
