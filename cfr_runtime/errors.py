"""The project's exceptions: one base type, so apps can catch every user-actionable error at once."""

from __future__ import annotations


class CfrError(ValueError):
    """Base of every error this project raises on bad input; the message says what to do."""


class InputError(CfrError):
    """An image, click or argument handed to the runtime is malformed or out of range."""


class StateError(CfrError):
    """A call came in the wrong order (a click before set_image, undo with no history)."""


class SessionNotFoundError(StateError):
    """A service call named a session that does not exist or has expired (idle timeout, LRU eviction)."""


class ContractError(CfrError):
    """A model file lacks the exported contract (tensor names, shapes, metadata) or does not match it."""


class CheckpointError(CfrError):
    """A checkpoint is unsafe, truncated, of another architecture, or its keys do not match."""


class EngineMismatchError(ContractError):
    """An engine was built for another GPU, TensorRT version or ONNX file."""


class ModelOutputError(ContractError):
    """A network returned NaN/inf or probabilities outside [0, 1] (corrupt weights, or an fp16 overflow)."""
