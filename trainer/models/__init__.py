"""The SimpleClick `PlainVitModel` family with the official module and parameter names."""

from .configs import ARCHS, arch_config, build_model
from .plainvit import PlainVitModel

__all__ = ["ARCHS", "PlainVitModel", "arch_config", "build_model"]
