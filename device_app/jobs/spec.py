"""What a child process is asked to do: a picklable job description (the daemon and the CLI build theirs from the
config with :func:`device_app.jobs.start.make_job`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from device_app.plan import Plan

JobKind = Literal["probe", "train", "evaluate"]


@dataclass(frozen=True)
class Job:
    """One child run.

    ``probe`` loads the bundle and reports the RSS of a loaded-but-idle process and the newest checkpoint;
    ``train`` runs ``steps`` optimizer steps with ``plan``; ``evaluate`` evaluates the newest checkpoint on
    ``split``, ``eval_batch`` windows at a time. ``expected_sha256``, when set, is the model hash the parent
    planned for: a child that finds another model in ``bundle_dir`` fails instead of training it.
    ``start_weights``, when set, is an ``.npz`` of trainable weights (by manifest name) that replace those of the
    restored checkpoint before the job starts (a fleet round starts from the global model this way); the rest of
    the variables (optimizer slots, compression state, the frozen prefix) stay as restored.
    """

    kind: JobKind
    bundle_dir: str
    db_path: str
    checkpoints_root: str
    threads: int = 2
    plan: Plan | None = None
    steps: int = 0
    learning_rate: float | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    progress_every: int = 10
    rollback_tolerance: float | None = None
    feature_cache: bool = True
    seed: int = 0
    split: str = "val"
    eval_batch: int = 0
    expected_sha256: str | None = None
    start_weights: str | None = None
    transaction: Any = None
