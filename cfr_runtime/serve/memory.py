"""What a session costs in memory, for the store's cap: counted after the fact, and estimated from an image
header before anything is decoded.

Why not just `Session.nbytes`: it counts the image, the probability maps, the undo history and the runner's
inputs, but not two things a square-contract Session also keeps (found with tracemalloc on 32 GrabCut
sessions after 3 clicks each: 371 MB traced for 195 MB of `nbytes`): the scratch buffers of its zoom-in
`Resampler`s (crop rows of the image and of the map, S x ROI-width, and the paste buffer, ROI-sized) and the
runner's output buffer. Those are what made `/health` say 410 MB where RSS had grown by 683 MB (issue 16,
case 8). `resident_bytes` adds an upper bound for them (the ROI as large as the image), so the accounted
figure is never below what the session holds; `bench/serve_attack.py` (row "memory accounting") compares it
with the server's RSS over HTTP.

Creating a session needs more than it keeps: decoding holds PIL's image and the uint8 array, and
`Session.set_image` makes a float32 temporary before its own float32 copy. Measured with ru_maxrss on
4000 x 3000 JPEG/PNG/BMP/TIFF uploads: 34 B/px at the peak (decode, set_image, two clicks) against 30 B/px
held afterwards; `creation_bytes` reserves the held estimate plus 15 B/px for that transient.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

F32 = 4
HOST_BYTES_PER_PIXEL = 22  # float32 RGB image (12), probs and its ping-pong spare (8), two bool masks (2)
CREATION_TRANSIENT_PER_PIXEL = 15  # the decoded uint8 RGB (3) + set_image's float32 temporary (12)


def scratch_bound(height: int, width: int, size: int) -> int:
    """Upper bound of a square-contract Session's resampling scratch (ROI = the whole image): crop of the
    image (2 x S x W x 3 rows + S x S x 3) and of the map (2 x S x W + S x S), paste (2 x H x S + H x W)."""
    return F32 * (8 * size * width + 4 * size * size + 2 * height * size + height * width)


def resident_bytes(session) -> int:
    """Bytes a live session holds: `Session.nbytes` plus the buffers it leaves out (see the module doc)."""
    contract = session.engine.contract
    size = contract.input_size
    extra = F32 * size * size  # the runner's output probabilities
    if not contract.full:
        h, w = session.probs.shape
        extra += scratch_bound(h, w, size)
    return session.nbytes + extra


def click_bytes(contract) -> int:
    """What one click adds to `resident_bytes`: its S x S float32 map in the undo history (every other buffer
    is allocated with the image), so a server that reports a session's size before the click has run (the
    cluster's early commit) knows the size it will have."""
    return F32 * contract.input_size ** 2


def estimate_resident(height: int, width: int, contract, clicks: int = 0) -> int:
    """`resident_bytes` of a session on an H x W image with `clicks` in its history, before it exists."""
    s, p = contract.input_size, contract.max_points
    runner = F32 * (3 * s * s + s * s + 2 * p * 3 + s * s)  # image, prev_mask, points, output
    host = HOST_BYTES_PER_PIXEL * height * width + F32 * 3 * s * s  # + the S x S x 3 crop of the image
    history = clicks * click_bytes(contract)
    return host + runner + history + scratch_bound(height, width, s)


def creation_bytes(height: int, width: int, contract) -> int:
    """Memory to reserve before decoding an H x W upload into a new session (held + creation transient)."""
    return estimate_resident(height, width, contract) + CREATION_TRANSIENT_PER_PIXEL * height * width


def rss_bytes() -> int | None:
    """This process's resident set size (Linux /proc; None elsewhere), for /health and the attack bench."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_memory() -> None:
    """Hand freed heap pages back to the OS after evictions (glibc keeps them otherwise); no-op elsewhere."""
    gc.collect()  # evicted sessions caught in reference cycles (e.g. by a traceback) go now, not at some later gc
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
