"""cfr_runtime: the embeddable CFR-ICL interactive segmentation runtime (numpy + ONNX Runtime, no torch)."""

__version__ = "0.1.0"

from .contract import Contract
from .engine import Engine
from .errors import CfrError, CheckpointError, ContractError, EngineMismatchError, InputError, StateError
from .session import Click, Session

__all__ = ["CfrError", "CheckpointError", "Click", "Contract", "ContractError", "Engine", "EngineMismatchError",
           "InputError", "Session", "StateError", "__version__"]
