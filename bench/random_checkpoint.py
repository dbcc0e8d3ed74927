"""Write a randomly initialised checkpoint of a named architecture (torch seed 0), in the project's format.

    python bench/random_checkpoint.py vit_base -o out/vitb_random.pth

Why: export, compile and latency figures of the large architectures are measured on random weights (no
official checkpoint is shipped or downloaded), and `cfr-export` takes a checkpoint file; this is the same
initialisation `bench/latency.py --arch` and `bench/pareto.py --arch` use internally, as a file a documented
command can export (docs/figures.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cfr_runtime.cli_options import command, option, overwrite_option, refuse_existing  # noqa: E402

ARCHS = ("tiny", "xtiny", "vit_base", "vit_large", "vit_huge")


@command("random_checkpoint.py")
@click.argument("arch", type=click.Choice(ARCHS), metavar="ARCH")
@option("-o", "--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True, metavar="FILE",
        help="The checkpoint file to write (.pth).")
@option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="torch's seed for the weights.")
@overwrite_option("an existing FILE")
def cli(arch: str, out: Path, seed: int, overwrite: bool) -> Path:
    """Write a random-init checkpoint of ARCH (tiny, xtiny, vit_base, vit_large, vit_huge) to FILE; see the
    module docstring of bench/random_checkpoint.py."""
    if not overwrite:
        refuse_existing([out])
    import torch

    from trainer.checkpoint import save_checkpoint
    from trainer.models import arch_config, build_model

    torch.manual_seed(seed)
    params = arch_config(arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(out, build_model(params), params, meta={"arch": arch, "random_init_seed": seed})
    print(f"wrote {path}: random-init {arch} (seed {seed})")
    return path


def main(argv: list[str] | None = None) -> Path:
    """Run as from the command line (errors print `random_checkpoint.py: error: ...` and exit 2)."""
    return cli.main(argv, standalone_mode=False)


if __name__ == "__main__":
    cli()
