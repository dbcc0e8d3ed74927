"""cfr_runtime: the embeddable CFR-ICL interactive segmentation runtime (numpy + ONNX Runtime, no torch)."""

__version__ = "0.1.0"

from .contract import Contract
from .engine import Engine
from .errors import (
    CfrError,
    CheckpointError,
    ContractError,
    EngineMismatchError,
    InputError,
    ModelOutputError,
    SessionNotFoundError,
    StateError,
)
from .session import Click, Session


def default_model() -> str:
    """Path of the bundled default ONNX model (the tiny CFR-ICL model shipped with the package)."""
    from pathlib import Path

    path = Path(__file__).with_name("assets") / "default.onnx"
    if not path.is_file():
        raise ContractError(f"the bundled default model is missing ({path}); reinstall cfr-icl")
    return str(path)


__all__ = ["CfrError", "CheckpointError", "Click", "Contract", "ContractError", "Engine", "EngineMismatchError",
           "InputError", "ModelOutputError", "Session", "SessionNotFoundError", "StateError", "__version__",
           "default_model"]
