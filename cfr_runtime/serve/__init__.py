"""`cfr-serve`: an HTTP annotation service around one shared Engine, with a web page to click on.

Needs the `serve` extra (FastAPI, uvicorn): `pip install -e ".[serve]"`. Nothing here imports torch.
"""

from __future__ import annotations

from .app import ServeConfig, create_app
from .codec import UploadLimits, mask_rle, rle_to_mask
from .store import SessionStore, StoreLimits, format_mode, parse_mode

__all__ = ["ServeConfig", "SessionStore", "StoreLimits", "UploadLimits", "create_app", "format_mode", "mask_rle",
           "parse_mode", "rle_to_mask"]
