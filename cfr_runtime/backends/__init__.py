"""Backends behind `Engine`; each imports its heavy library only when selected."""
