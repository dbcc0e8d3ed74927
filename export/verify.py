"""Check an exported graph against the torch function on fresh random inputs and fail past a tolerance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cfr_runtime.contract import INPUT_NAMES, OUTPUT_PROBS, Contract
from trainer.models.graph import ContractGraph

from .onnx_export import ExportError, torch_reference, verification_cases

# probabilities in [0, 1]; fp32 differs by reduction order only, fp16 by half-precision rounding, int8
# (export/quantize.py: int8 weights, activations quantized at run time) by 8-bit rounding of every MatMul
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 5e-2}


@dataclass
class VerifyReport:
    max_abs_diff: float
    mask_disagreement: float  # fraction of pixels whose (p > threshold) differs
    cases: int
    tolerance: float

    def __str__(self) -> str:
        return (f"max |onnx - torch| = {self.max_abs_diff:.3g} over {self.cases} cases "
                f"(tolerance {self.tolerance:g}); mask agreement {100 * (1 - self.mask_disagreement):.4f}% "
                f"(worst case; disagreement {100 * self.mask_disagreement:.4f}%)")


def verify_onnx(path: str | Path, graph: ContractGraph, contract: Contract, seed: int | None = None,
                tolerance: float | None = None) -> VerifyReport:
    """Every ONNX artifact (fp32, fp16, int8, offline-optimized) against the fp32 torch graph; the tolerance
    comes from the contract's precision."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seed = int(np.random.default_rng().integers(1 << 30)) if seed is None else seed
    tol = TOLERANCE[contract.precision] if tolerance is None else tolerance
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
