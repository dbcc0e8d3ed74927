"""`cfr-export CHECKPOINT --engine onnx -o DIR`: write the contract graph and prove it matches torch.

Every file is written under a temporary name, verified, and only then renamed over the old one: a rejected
export never replaces a good model. Requirements of the chosen engine (TensorRT, CUDA) are checked before
the (minutes-long) export starts.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import click

from cfr_runtime.cli_options import checkpoint_argument, command, option, out_option, overwrite_option, refuse_existing
from cfr_runtime.contract import MAX_BATCH_LIMIT, MAX_INPUT_SIZE, MAX_POINTS_LIMIT
from cfr_runtime.errors import CfrError
from cfr_runtime.fileio import commit, remove_new_dirs_on_error, staged_file


def _preflight(engine: str, device: str) -> str:
    """Refuse up front what would fail only after the export: returns the aoti device."""
    if engine == "trt":
        from .trt import check_trt_available

        check_trt_available()
    if engine == "aoti":
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise CfrError("--engine aoti --device cuda: no CUDA GPU is visible to torch on this machine; "
                           "use --device cpu (or auto), or run the export on the GPU machine")
        return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return device


def _export_aoti(checkpoint: Path, out_dir: Path, contract, graph, fp16: bool, device: str,
                 verify_seed: int | None, limits: dict) -> None:
    """Compile into a staging folder, check against torch, then move the package beside the ONNX graph."""
    from cfr_runtime.contract import INPUT_NAMES

    from .aoti import aoti_engine, export_aoti, full_program_outputs, package_name, sidecar_name
    from .onnx_export import full_verification_cases, torch_reference, verification_cases
    from .verify import check_output_range, worst_diff

    precision = "fp16" if fp16 else "fp32"
    final = out_dir / package_name(contract.full, precision)
    # the package and its JSON sidecar are staged together under their final names, moved only once they match
    with staged_file(final, ".partial", folder=True) as staged:
        package = export_aoti(checkpoint, staged.parent, contract.input_size, contract.max_points, contract.flip,
                              precision, device, **limits)
        worst = 0.0
        if contract.full:
            for case in full_verification_cases(contract, seed=verify_seed or 0):
                got = full_program_outputs(package, case)
                check_output_range(got, f"{package.name}: the compiled package")
                worst = worst_diff(worst, got, torch_reference(graph, case)[0])
        else:
            runner = aoti_engine(package, cuda_graph=False).new_runner()
            for case in verification_cases(contract, seed=verify_seed or 0):
                for name in INPUT_NAMES:
                    getattr(runner, name)[...] = case[name]
                runner.image_dirty = True
                got = runner.run()
                check_output_range(got, f"{package.name}: the compiled package")
                worst = worst_diff(worst, got, torch_reference(graph, case))
        tol = 2e-2 if fp16 else 1e-4
        if not worst <= tol:  # NaN included
            raise CfrError(f"{package.name}: compiled package does not match torch (max abs diff {worst:.3g}, "
                           f"tolerance {tol:g}); not written")
        commit(package, final, [sidecar_name(final)])
    click.echo(f"wrote {final}\n  aoti: max |aoti - torch fp32| = {worst:.3g} (tolerance {tol:g})")


@command("cfr-export")
@checkpoint_argument()
@option("--engine", type=click.Choice(["onnx", "trt", "aoti"]), default="onnx", show_default=True,
        help="onnx: the ONNX graph; trt: also a TensorRT plan built from it; aoti: also an "
             "AOTInductor package (compiled PyTorch, fp16 with --fp16).")
@option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
        help="Device the aoti package is compiled for.")
@out_option(required=True, name="out_dir", help="Output folder (model.onnx and the other files go there).")
@overwrite_option("model files an earlier export wrote in the output folder")
@option("--size", type=click.IntRange(1, MAX_INPUT_SIZE), default=None,
        help="Network input size S (default: the checkpoint's own; 672 for DAVIS-style runs). Another "
             "size resizes the position embedding, which changes the results.")
@option("--max-points", type=click.IntRange(1, MAX_POINTS_LIMIT), default=24, show_default=True,
        help="Click rows P per sign.")
@option("--flip/--no-flip", default=True, show_default=True, help="Flip averaging inside the graph.")
@option("--fp16", is_flag=True, help="fp16 graph (fp32 I/O; LayerNorm, softmax, sigmoid in fp32).")
@option("--int8", is_flag=True, help="Also model_int8.onnx: int8 weights (ONNX Runtime dynamic quantization), "
        "graph optimizations saved in the file; for the CPU provider (export/quantize.py).")
@option("--verify-seed", type=click.IntRange(0, 2**31 - 1), default=None,
        help="Seed of the verification inputs (default: fresh).")
@option("--graph", type=click.Choice(["square", "full"]), default="square", show_default=True,
        help="square: the network at S x S, zoom-in on the host; full: the whole click at the image's "
             "own resolution (crop, paste-back, zoom box and A-CFR count inside the graph).")
@option("--max-image", type=str, default=None, metavar="HxW",
        help="full graph: largest image accepted (default 8192x8192); TensorRT's profile maximum.")
@option("--opt-image", type=str, default=None, metavar="HxW",
        help="full graph: the image size TensorRT tunes for (default 1024x1024).")
@option("--max-batch", type=click.IntRange(1, MAX_BATCH_LIMIT), default=1, show_default=True, metavar="N",
        help="square graph: a batch axis, so one call runs the forwards of up to N sessions (cfr-serve --ray "
             "--batch-size); 1: none (batch-1 graph).")
def main(checkpoint: Path, engine: str, device: str, out_dir: Path, overwrite: bool, size: int | None,
         max_points: int, flip: bool, fp16: bool, int8: bool, verify_seed: int | None, graph: str,
         max_image: str | None, opt_image: str | None, max_batch: int) -> None:
    """Export CHECKPOINT (official SimpleClick/CFR-ICL or cfr-train) to the runtime's ONNX contract."""
    limits = dict(graph=graph, max_image=_hw(max_image, "--max-image"), opt_image=_hw(opt_image, "--opt-image"))
    _check_batch(max_batch, graph, engine, int8)
    if not overwrite:
        refuse_existing(_targets(out_dir, graph, fp16, int8, engine),
                        "pass --overwrite to replace it (a rejected export still keeps it), or choose another -o")
    try:
        with remove_new_dirs_on_error(out_dir):  # a failed first export leaves no empty folder behind
            _export(checkpoint, engine, device, out_dir, size, max_points, flip, fp16, int8, verify_seed, limits,
                    max_batch)
    except CfrError as exc:
        click.echo(f"cfr-export: error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # a full disk or a folder made read-only mid-export
        click.echo(f"cfr-export: error: cannot write to {out_dir}: {exc}", err=True)
        sys.exit(2)


def _export(checkpoint: Path, engine: str, device: str, out_dir: Path, size: int | None, max_points: int,
            flip: bool, fp16: bool, int8: bool, verify_seed: int | None, limits: dict, max_batch: int) -> None:
    """Every artifact in turn, each verified against the fp32 torch graph before it takes its real name."""
    aoti_device = _preflight(engine, device)
    from .verify import TorchReferences, export_verified, fresh_seed

    # one set of fresh inputs for every artifact of this run, so torch computes its reference outputs once
    seed, refs = (fresh_seed() if verify_seed is None else verify_seed), TorchReferences()
    fp32_path, contract, torch_graph, report = export_verified(checkpoint, out_dir, size, max_points, flip,
                                                               seed=seed, references=refs, max_batch=max_batch,
                                                               **limits)
    native = contract.arch.get("backbone_params", {}).get("img_size", [contract.input_size])[0]
    if native != contract.input_size:
        click.echo(f"note: the checkpoint was trained at {native} px; exported at --size "
                   f"{contract.input_size} (position embedding resized: different results and "
                   f"{(contract.input_size / native) ** 2:.2g}x the work per forward)")
    click.echo(f"wrote {_with_data(fp32_path)}\n  fp32: {report}")
    onnx_path = fp32_path
    if fp16:
        fp16_export = export_verified(checkpoint, out_dir, contract.input_size, max_points, flip, fp16=True,
                                      seed=seed, base=(contract, torch_graph), references=refs,
                                      max_batch=max_batch, **limits)
        onnx_path, report16 = fp16_export[0], fp16_export[3]
        del fp16_export  # it holds the torch graph too, which the int8 step frees
        click.echo(f"wrote {_with_data(onnx_path)}\n  fp16: {report16}")
    if int8:
        from .quantize import quantize_int8, read_contract
        from .verify import verified_commit

        if engine != "aoti":  # the int8 check reuses the cached torch outputs: free the model (ViT-H: 2.6 GB)
            torch_graph = None  # before ONNX Runtime's quantizer, which holds the fp32 weights several times
            gc.collect()
        final = fp32_path.with_name(fp32_path.stem + "_int8.onnx")
        with staged_file(final, ".partial", folder=True) as staged:  # verified, then moved over the old one
            quantize_int8(fp32_path, staged)
            report8 = verified_commit(staged, final, torch_graph, read_contract(staged), seed=seed,
                                      references=refs)
        click.echo(f"wrote {_with_data(final)}\n  int8: {report8}")
    if engine == "trt":
        from .trt import build_plan

        plan = build_plan(onnx_path, out_dir)
        click.echo(f"wrote {plan}")
    if engine == "aoti":
        _export_aoti(checkpoint, out_dir, contract, torch_graph, fp16, aoti_device, verify_seed, limits)


def _with_data(path: Path) -> str:
    """The graph's path, and its data file's name when its weights are stored beside it."""
    from cfr_runtime.onnx_file import data_file

    record = data_file(path)
    return f"{path} (+ {record.name}, {record.size / 1e9:.2f} GB)" if record else str(path)


def _check_batch(max_batch: int, graph: str, engine: str, int8: bool) -> None:
    """Refuse up front the exports a batch axis does not fit."""
    if max_batch == 1:
        return
    if graph != "square":
        raise click.BadParameter("a batch axis is for the square graph (--graph square); the full graph runs one "
                                 "image at its own size per call", param_hint="--max-batch")
    if engine == "trt":
        raise click.BadParameter("TensorRT plans are built for batch 1 here (fixed-shape profile); export the plan "
                                 "without --max-batch, or serve the batch-axis ONNX graph on ONNX Runtime's CUDA "
                                 "provider", param_hint="--max-batch")
    if int8:
        raise click.BadParameter("--int8 quantizes activations with scales computed over each call's whole input, "
                                 "so a click's result would depend on the other sessions in its batch; export the "
                                 "int8 graph without --max-batch", param_hint="--max-batch")


def _targets(out_dir: Path, graph: str, fp16: bool, int8: bool, engine: str) -> list[Path]:
    """The files this export would write (named as export.onnx_export.model_file_name names them)."""
    from types import SimpleNamespace

    from .onnx_export import model_file_name

    full = graph == "full"
    fp32 = model_file_name(SimpleNamespace(full=full, precision="fp32"))
    names = [fp32] + ([model_file_name(SimpleNamespace(full=full, precision="fp16"))] if fp16 else [])
    if int8:
        names.append(fp32.replace(".onnx", "_int8.onnx"))
    if engine == "trt":
        names.append(names[1 if fp16 else 0].replace(".onnx", ".plan"))  # export.trt.build_plan's name
    if engine == "aoti":
        names.append(f"{'model_full' if full else 'model'}_{'fp16' if fp16 else 'fp32'}.pt2")  # export.aoti's
    return [out_dir / n for n in names]


def _hw(text: str | None, option: str) -> tuple[int, int] | None:
    """'HxW' -> (H, W)."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{option} takes HxW, e.g. 4000x6000; got {text!r}") from None
    if h <= 0 or w <= 0:
        raise click.BadParameter(f"{option} must be positive, got {text!r}")
    return h, w


if __name__ == "__main__":
    main()
