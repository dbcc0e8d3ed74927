"""Check an exported graph against the torch function on fresh random inputs and fail past a tolerance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfr_runtime.contract import INPUT_NAMES, OUTPUT_PROBS, Contract
from cfr_runtime.zoom import mask_box
from trainer.models.full_graph import FullGraph
from trainer.models.graph import ContractGraph

from .onnx_export import ExportError, full_verification_cases, torch_reference, verification_cases

# probabilities in [0, 1]; fp32 differs by reduction order only, fp16 by half-precision rounding
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


@dataclass
class VerifyReport:
    max_abs_diff: float
    mask_disagreement: float  # fraction of pixels whose (p > threshold) differs
    cases: int
    tolerance: float

    def __str__(self) -> str:
        return (f"max |onnx - torch| = {self.max_abs_diff:.3g} over {self.cases} cases "
                f"(tolerance {self.tolerance:g}); mask disagreement {100 * self.mask_disagreement:.4f}%")


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


def verify_onnx(path: str | Path, graph: ContractGraph | FullGraph, contract: Contract, seed: int | None = None,
                tolerance: float | None = None) -> VerifyReport:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seed = int(np.random.default_rng().integers(1 << 30)) if seed is None else seed
    tol = TOLERANCE[contract.precision] if tolerance is None else tolerance
    if contract.full:
        worst, disagree, cases = 0.0, 0.0, full_verification_cases(contract, seed)
        for inputs in cases:
            want = torch_reference(graph, inputs)[0]
            got = sess.run(list(contract.output_names()), {k: inputs[k] for k in contract.input_names()})
            _check_full_outputs(path, got, inputs, contract)
            worst = max(worst, float(np.abs(got[0] - want).max()))
            disagree = max(disagree, float(((got[0] > contract.threshold) != (want > contract.threshold)).mean()))
        report = VerifyReport(worst, disagree, len(cases), tol)
        if not worst <= tol:
            raise ExportError(f"{path}: exported full graph does not match torch: {report}")
        return report
    worst, disagree, cases = 0.0, 0.0, verification_cases(contract, seed)
    for inputs in cases:
        want = torch_reference(graph, inputs)
        got = sess.run([OUTPUT_PROBS], {k: inputs[k] for k in INPUT_NAMES})[0]
        worst = max(worst, float(np.abs(got - want).max()))
        disagree = max(disagree, float(((got > contract.threshold) != (want > contract.threshold)).mean()))
    report = VerifyReport(worst, disagree, len(cases), tol)
    if not worst <= tol:  # also catches NaN
        raise ExportError(f"{path}: exported graph does not match torch: {report}")
    return report
