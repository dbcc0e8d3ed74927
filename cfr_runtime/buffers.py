"""Host buffers of the square contract, allocated from its shapes: one piece shared by every backend.

It lives below `engine` and the backends (it imports only the contract) so that the arrows point one way:
`engine` -> `backends.*` -> `buffers` -> `contract`. (It used to sit in `engine.py`, which the backends then
imported while `engine` imported them: a circle that only lazy imports kept from failing.)
"""

from __future__ import annotations

import numpy as np

from .contract import INPUT_DISK_ROWS, Contract


def alloc_buffers(contract: Contract) -> dict[str, np.ndarray]:
    """name -> zeroed float32 array of every input and output; the disk rows padded with -1 (no click)."""
    bufs = {name: np.zeros(shape, np.float32) for name, shape in contract.shapes().items()}
    bufs[INPUT_DISK_ROWS].fill(-1.0)
    return bufs
