"""Check an exported graph against the torch function on fresh random inputs and fail past a tolerance."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfr_runtime.contract import INPUT_NAMES, OUTPUT_PROBS, Contract
from cfr_runtime.errors import CfrError, ModelOutputError
from cfr_runtime.onnx_file import check_data_file
from cfr_runtime.zoom import mask_box
from trainer.models.full_graph import FullGraph
from trainer.models.graph import ContractGraph

from .graph_file import commit_graph
from .onnx_export import ExportError, full_verification_cases, stack_batch, torch_reference, verification_cases

# probabilities in [0, 1]; fp32 differs by reduction order only, fp16 by half-precision rounding, int8
# (export/quantize.py: int8 weights, activations quantized at run time) by 8-bit rounding of every MatMul
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 5e-2}
log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    max_abs_diff: float
    mask_disagreement: float  # fraction of pixels whose (p > threshold) differs
    cases: int
    tolerance: float
    # graphs with a batch axis: max |one call on every case - one call per case| (0.0: bit for bit)
    batch_diff: float | None = None

    def __str__(self) -> str:
        text = (f"max |onnx - torch| = {self.max_abs_diff:.3g} over {self.cases} cases "
                f"(tolerance {self.tolerance:g}); mask agreement {100 * (1 - self.mask_disagreement):.4f}% "
                f"(worst case; disagreement {100 * self.mask_disagreement:.4f}%)")
        if self.batch_diff is not None:
            text += f"; batched vs one by one: max diff {self.batch_diff:.3g}"
        return text


def _check_full_outputs(path, got: list[np.ndarray], inputs: dict[str, np.ndarray], contract: Contract) -> None:
    """The full graph's box and change count must be what the host computes from the map it returned."""
    probs, box, changed = got[0], got[1], int(got[2][0])
    want_box = mask_box(probs > inputs["thresholds"][1])
    have_box = tuple(int(v) for v in box) if box[0] <= box[1] else None
    t = inputs["thresholds"][0]
    want_changed = int(np.count_nonzero((probs > t) != (inputs["prev_probs"] > t)))
    if have_box != want_box or changed != want_changed:
        raise ExportError(f"{path}: full graph reports box {have_box} / changed {changed}, its own map gives "
                          f"{want_box} / {want_changed}")


class TorchReferences:
    """The outputs of ONE fp32 torch graph on verification cases, computed once per (seed, case) and shared by
    the verifications of one cfr-export run: its fp32, fp16 and int8 graphs are checked on the same fresh inputs,
    the torch forward is half of each check (ViT-H on 2 CPU cores: minutes), and once the outputs are here the
    torch model itself can be freed before the int8 quantization (2.6 GB for ViT-H)."""

    def __init__(self) -> None:
        self._outputs: dict[tuple, object] = {}

    def __call__(self, graph: ContractGraph | FullGraph | None, contract: Contract, seed: int, case: int,
                 inputs: dict[str, np.ndarray]):
        key = (seed, case, contract.graph, contract.input_size, contract.max_points, contract.flip)
        if key not in self._outputs:
            if graph is None:
                raise ExportError(f"no torch reference for verification case {key} (the torch model was "
                                  "released before every case was computed)")
            self._outputs[key] = torch_reference(graph, inputs)
        return self._outputs[key]


def fresh_seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


def verify_onnx(path: str | Path, graph: ContractGraph | FullGraph | None, contract: Contract,
                seed: int | None = None, tolerance: float | None = None,
                references: TorchReferences | None = None) -> VerifyReport:
    """Every ONNX artifact (fp32, fp16, int8, offline-optimized) against the fp32 torch graph; the tolerance
    comes from the contract's precision. `references` shares the torch outputs between the checks of one run
    (`graph` may then be None for cases it already holds)."""
    import onnxruntime as ort

    log.info("%s: verifying against torch", Path(path).name)
    check_data_file(path)  # the weights ONNX Runtime is about to read are the ones that were exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    log.info("%s: ONNX Runtime session loaded", Path(path).name)
    seed = fresh_seed() if seed is None else seed
    reference = references or TorchReferences()
    tol = TOLERANCE[contract.precision] if tolerance is None else tolerance
    if contract.full:
        worst, disagree, cases = 0.0, 0.0, full_verification_cases(contract, seed)
        for i, inputs in enumerate(cases):
            want = reference(graph, contract, seed, i, inputs)[0]
            check_output_range(want, f"{path}: the torch model")
            got = sess.run(list(contract.output_names()), {k: inputs[k] for k in contract.input_names()})
            check_output_range(got[0], f"{path}: the exported graph")
            _check_full_outputs(path, got, inputs, contract)
            worst = worst_diff(worst, got[0], want)
            disagree = max(disagree, float(((got[0] > contract.threshold) != (want > contract.threshold)).mean()))
        report = VerifyReport(worst, disagree, len(cases), tol)
        if not worst <= tol:  # also catches NaN
            raise ExportError(f"{path}: exported full graph does not match torch: {report}")
        return report
    worst, disagree, cases = 0.0, 0.0, verification_cases(contract, seed)
    singles = []
    for i, inputs in enumerate(cases):
        want = reference(graph, contract, seed, i, inputs)
        check_output_range(want, f"{path}: the torch model")
        got = sess.run([OUTPUT_PROBS], {k: inputs[k] for k in INPUT_NAMES})[0]
        check_output_range(got, f"{path}: the exported graph")
        worst = worst_diff(worst, got, want)
        disagree = max(disagree, float(((got > contract.threshold) != (want > contract.threshold)).mean()))
        singles.append((got, want))
    batch_diff = None
    if contract.batched:  # the cases again, as one call (as a server batching sessions runs them)
        n = min(len(cases), contract.max_batch)
        got = sess.run([OUTPUT_PROBS], stack_batch(cases[:n]))[0]
        check_output_range(got, f"{path}: the exported graph (batched)")
        batch_diff = 0.0
        for i, (single, want) in enumerate(singles[:n]):
            worst = worst_diff(worst, got[i:i + 1], want)
            batch_diff = worst_diff(batch_diff, got[i:i + 1], single)
    report = VerifyReport(worst, disagree, len(cases), tol, batch_diff)
    if not worst <= tol:  # also catches NaN
        raise ExportError(f"{path}: exported graph does not match torch: {report}")
    return report


def worst_diff(worst: float, got: np.ndarray, want: np.ndarray) -> float:
    """Running max |got - want| that keeps NaN: `max(0.0, nan)` is 0.0, which once let NaN outputs 'verify'."""
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())
    return float("nan") if np.isnan(worst) or np.isnan(diff) else max(worst, diff)


def check_output_range(probs: np.ndarray, what: str) -> None:
    """Probabilities must be finite and in [0, 1]; anything else is refused with the offending range."""
    lo, hi = float(np.min(probs)), float(np.max(probs))
    if not (0.0 <= lo and hi <= 1.0):
        raise ModelOutputError(f"{what} returns values outside [0, 1] (min {lo}, max {hi}): NaN/inf weights or "
                               "a precision overflow; nothing was kept")


def verified_commit(staged: Path, final: Path, graph: ContractGraph | FullGraph | None, contract: Contract,
                    seed: int | None = None, references: TorchReferences | None = None) -> VerifyReport:
    """Verify a staged graph (fp32, fp16, full or int8) against torch and only then move it, with its data file,
    over `final`: the one route by which every ONNX artifact of cfr-export reaches its real name."""
    report = verify_onnx(staged, graph, contract, seed=seed, references=references)
    commit_graph(staged, final)
    log.info("%s: committed", final.name)
    return report


def export_verified(checkpoint: str | Path, out_dir: str | Path, size: int | None, max_points: int, flip: bool,
                    fp16: bool = False, seed: int | None = None,
                    base: tuple[Contract, ContractGraph | FullGraph] | None = None,
                    references: TorchReferences | None = None, **graph_options
                    ) -> tuple[Path, Contract, ContractGraph | FullGraph, VerifyReport]:
    """Export into a staging folder, verify against torch there, and only then replace `model[_fp16].onnx` (and
    its data file).

    A rejected graph is deleted with its staging folder and an existing model is left untouched. `base` is the
    (contract, fp32 graph) of the fp32 export: the fp16 export is made from that model and checked against it;
    `graph_options` (graph, max_image, opt_image, max_batch) choose the square or full-resolution contract and
    its batch axis."""
    from .onnx_export import export_onnx, model_file_name

    reports: list[VerifyReport] = []

    def check(staged: Path, contract: Contract, graph: ContractGraph | FullGraph) -> None:
        name = model_file_name(contract)
        try:
            reports.append(verify_onnx(staged, graph, contract, seed=seed, references=references))
        except CfrError as exc:
            kept = " (the existing one was kept)" if (Path(out_dir) / name).exists() else ""
            raise type(exc)(f"{name} not written{kept}: {str(exc).replace(str(staged), 'export')}") from None

    path, contract, graph = export_onnx(checkpoint, out_dir, size, max_points, flip, fp16=fp16, check=check,
                                        base=base, **graph_options)
    return path, contract, graph, reports[0]
