"""The committed operation and parameter counts (bench/results/model_size/) are what the architectures give today.

docs/ray.md derives its GPU estimate from ViT-B's count and docs/large-models.md quotes ViT-H's parameters; both
go through docs/figures.md to `model_size.json`. Counting on torch's meta device allocates nothing and takes about
a second per architecture, so a change to an architecture's configuration that leaves the committed counts stale
fails here.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT

RESULT = ROOT / "bench" / "results" / "model_size" / "model_size.json"


@pytest.mark.parametrize("arch", ["vit_base", "vit_huge"])
def test_committed_counts_match_a_fresh_count(arch: str):
    pytest.importorskip("torch")
    from bench.model_size import count

    committed = {r["arch"]: r for r in json.loads(RESULT.read_text())["rows"]}
    assert count(arch, committed[arch]["size"]) == committed[arch]
