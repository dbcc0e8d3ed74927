"""`cfr-export CHECKPOINT --engine onnx -o DIR`: write the contract graph and prove it matches torch."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cfr_runtime.errors import CfrError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--engine", type=click.Choice(["onnx", "trt", "aoti"]), default="onnx", show_default=True,
              help="onnx: the ONNX graph; trt: also a TensorRT plan built from it; aoti: also an "
                   "AOTInductor package (compiled PyTorch, fp16 with --fp16).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Device the aoti package is compiled for.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory.")
@click.option("--size", type=int, default=448, show_default=True, help="Network input size S (672 for DAVIS).")
@click.option("--max-points", type=int, default=24, show_default=True, help="Click rows P per sign.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Flip averaging inside the graph.")
@click.option("--fp16", is_flag=True, help="fp16 graph (fp32 I/O; LayerNorm, softmax, sigmoid in fp32).")
@click.option("--int8", is_flag=True, help="Also model_int8.onnx: int8 weights (ONNX Runtime dynamic quantization), "
              "graph optimizations saved in the file; for the CPU provider (export/quantize.py).")
@click.option("--verify-seed", type=int, default=None, help="Seed of the verification inputs (default: fresh).")
def main(checkpoint: Path, engine: str, device: str, out_dir: Path, size: int, max_points: int, flip: bool,
         fp16: bool, int8: bool, verify_seed: int | None) -> None:
    """Export CHECKPOINT (official SimpleClick/CFR-ICL or cfr-train) to the runtime's ONNX contract."""
    from .onnx_export import export_onnx
    from .verify import verify_onnx

    if size <= 0 or max_points <= 0:
        raise click.BadParameter("--size and --max-points must be positive")
    try:
        fp32_path, contract, graph = export_onnx(checkpoint, out_dir, size, max_points, flip, fp16=False)
        report = verify_onnx(fp32_path, graph, contract, seed=verify_seed)
        click.echo(f"wrote {fp32_path}\n  fp32: {report}")
        onnx_path = fp32_path
        if fp16:
            onnx_path, contract16, _ = export_onnx(checkpoint, out_dir, size, max_points, flip, fp16=True)
            report16 = verify_onnx(onnx_path, graph, contract16, seed=verify_seed)
            click.echo(f"wrote {onnx_path}\n  fp16: {report16}")
        if int8:
            from .quantize import quantize_int8, read_contract

            int8_path = quantize_int8(fp32_path)
            report8 = verify_onnx(int8_path, graph, read_contract(int8_path), seed=verify_seed)
            click.echo(f"wrote {int8_path}\n  int8: {report8}")
        if engine == "trt":
            from .trt import build_plan

            plan = build_plan(onnx_path, out_dir)
            click.echo(f"wrote {plan}")
        if engine == "aoti":
            import numpy as np
            import torch

            from cfr_runtime.contract import INPUT_NAMES

            from .aoti import aoti_engine, export_aoti
            from .onnx_export import torch_reference, verification_cases

            dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
            package = export_aoti(checkpoint, out_dir, size, max_points, flip, "fp16" if fp16 else "fp32", dev)
            runner = aoti_engine(package, cuda_graph=False).new_runner()
            worst = 0.0
            for case in verification_cases(contract, seed=verify_seed or 0):
                for name in INPUT_NAMES:
                    getattr(runner, name)[...] = case[name]
                runner.image_dirty = True
                worst = max(worst, float(np.abs(runner.run() - torch_reference(graph, case)).max()))
            tol = 2e-2 if fp16 else 1e-4
            click.echo(f"wrote {package}\n  aoti: max |aoti - torch fp32| = {worst:.3g} (tolerance {tol:g})")
            if not worst <= tol:
                raise CfrError(f"{package}: compiled package does not match torch (max abs diff {worst:.3g})")
    except CfrError as exc:
        click.echo(f"cfr-export: error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
