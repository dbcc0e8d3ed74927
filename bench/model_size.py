"""Parameters and floating-point operations of one contract forward, per architecture: counted, not timed.

    python bench/model_size.py --arch vit_base,vit_large,vit_huge --size 448 -o bench/results/model_size

Why: docs/ray.md derives its GPU batching estimate from the compute of one click's forward, and
docs/large-models.md quotes ViT-H's parameter count; docs/figures.md needs a committed file behind both. The
model is built on torch's meta device (shapes only: no weights are allocated, nothing is run), so the count
takes seconds and needs no checkpoint; the operations are what `bench.gpu_backends.forward_flops` counts
(torch's FlopCounterMode over the exported contract graph: matmuls, convolutions, attention; with flip, the
two images of a click). Deterministic: no machine or load average is recorded because none affects it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfr_runtime.cli_options import command, option, out_option, overwrite_option, refuse_existing  # noqa: E402

NAME = "model_size"


def count(arch: str, size: int, flip: bool = True) -> dict:
    """Parameters and forward operations of the named architecture at a square input `size`."""
    import torch

    from bench.gpu_backends import forward_flops
    from trainer.models.configs import arch_config, build_model

    with torch.device("meta"):
        model = build_model(arch_config(arch, size))
    return {"arch": arch, "size": size, "flip": flip, "parameters": sum(p.numel() for p in model.parameters()),
            "forward_flop": forward_flops(model, size, flip=flip)}


def markdown(rows: list[dict], command_line: str, versions: dict) -> str:
    base = next((r for r in rows if r["arch"] == "vit_base"), None)
    lines = ["# Parameters and operations of one contract forward (counted on torch's meta device)", "",
             f"`{command_line}`", "",
             f"torch {versions['torch']}; FlopCounterMode over the contract graph (matmuls, convolutions, "
             "attention), flip included: the two images of one click.", "",
             "| arch | input | parameters (M) | GFLOP per forward | vs vit_base |",
             "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['forward_flop'] / base['forward_flop']:.2f}x" if base else "-"
        lines.append(f"| {r['arch']} | {r['size']} | {r['parameters'] / 1e6:.1f} | {r['forward_flop'] / 1e9:.1f} "
                     f"| {ratio} |")
    return "\n".join(lines) + "\n"


@command("model_size.py")
@option("--arch", "archs", default="vit_base,vit_large,vit_huge", show_default=True, metavar="A,B,...",
        help="Comma-separated architecture names (trainer/models/configs.py).")
@option("--size", default=448, show_default=True, type=click.IntRange(min=16), help="Square input size.")
@out_option(default=ROOT / "out" / "bench", shown="out/bench",
            help="Folder for model_size.json / .md (pass bench/results/model_size to update the committed one).")
@overwrite_option("model_size.json / model_size.md in --out")
def cli(archs: str, size: int, out: Path, overwrite: bool) -> list[dict]:
    """Count the parameters and the floating-point operations of one forward of each architecture (meta device:
    nothing is allocated or run); writes model_size.json and model_size.md."""
    from trainer.models.configs import ARCHS

    names = [a.strip() for a in archs.split(",") if a.strip()]
    unknown = [a for a in names if a not in ARCHS]
    if not names or unknown:
        raise click.BadParameter(f"unknown architecture {unknown or archs!r}; choose from {sorted(ARCHS)}",
                                 param_hint="--arch")
    paths = [out / f"{NAME}.json", out / f"{NAME}.md"]
    if not overwrite:
        refuse_existing(paths, "pass --overwrite to replace it, or choose another --out")
    import torch

    rows = [count(a, size) for a in names]
    command_line = f"python bench/model_size.py --arch {','.join(names)} --size {size} -o {out}"
    versions = {"torch": torch.__version__}
    out.mkdir(parents=True, exist_ok=True)
    paths[0].write_text(json.dumps({"command": command_line, "versions": versions, "rows": rows}, indent=1) + "\n")
    paths[1].write_text(markdown(rows, command_line, versions))
    for r in rows:
        print(f"{r['arch']} at {size}: {r['parameters'] / 1e6:.1f} M parameters, "
              f"{r['forward_flop'] / 1e9:.1f} GFLOP per forward (flip)")
    return rows


if __name__ == "__main__":
    cli()
