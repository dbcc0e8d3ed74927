"""The shipped default checkpoint (trained by cfr-train on shared/data/train; see README)."""

from __future__ import annotations

from pathlib import Path

from cfr_runtime.errors import CheckpointError

DEFAULT_CHECKPOINT = Path(__file__).with_name("assets") / "default.pth"


def default_checkpoint() -> Path:
    if not DEFAULT_CHECKPOINT.is_file():
        raise CheckpointError(f"the bundled default checkpoint is missing ({DEFAULT_CHECKPOINT}); reinstall cfr-icl")
    return DEFAULT_CHECKPOINT
