"""TensorRT plan sidecars: what a plan was built for, and the refusal of a plan built for something else.

A serialized TensorRT engine only runs on the GPU model (compute capability) and TensorRT version that
built it; loading it elsewhere fails deep inside TensorRT or, worse, runs untuned. The sidecar
`<plan>.json` records the contract plus those facts, and `check_plan` compares them before loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .contract import Contract
from .errors import ContractError, EngineMismatchError

SIDECAR_SUFFIX = ".json"


@dataclass(frozen=True)
class PlanInfo:
    contract: Contract
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    onnx_sha256: str

    def to_json(self) -> str:
        return json.dumps({"contract": json.loads(self.contract.to_json()), "tensorrt_version": self.tensorrt_version,
                           "gpu_name": self.gpu_name, "compute_capability": self.compute_capability,
                           "onnx_sha256": self.onnx_sha256}, indent=1, sort_keys=True)


def sidecar_path(plan: Path) -> Path:
    return plan.with_suffix(plan.suffix + SIDECAR_SUFFIX)


def read_sidecar(plan: Path) -> PlanInfo:
    path = sidecar_path(plan)
    if not path.is_file():
        raise ContractError(f"{plan}: no sidecar {path.name}; rebuild the plan with `cfr-export --engine trt`")
    try:
        data = json.loads(path.read_text())
        return PlanInfo(Contract.from_json(json.dumps(data["contract"]), str(path)), str(data["tensorrt_version"]),
                        str(data["gpu_name"]), str(data["compute_capability"]), str(data["onnx_sha256"]))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ContractError(f"{path}: malformed plan sidecar ({exc})") from None


def check_plan(info: PlanInfo, tensorrt_version: str, gpu_name: str, compute_capability: str, plan: str) -> None:
    """Refuse a plan built for another TensorRT version or GPU; say how to rebuild it."""
    problems = []
    if info.tensorrt_version != tensorrt_version:
        problems.append(f"TensorRT {info.tensorrt_version} built it, this process has TensorRT {tensorrt_version}")
    if info.compute_capability != compute_capability:
        problems.append(f"it was built for {info.gpu_name} (sm_{info.compute_capability.replace('.', '')}), "
                        f"this GPU is {gpu_name} (sm_{compute_capability.replace('.', '')})")
    if problems:
        raise EngineMismatchError(f"{plan}: refusing the TensorRT plan: " + "; ".join(problems) +
                                  ". Rebuild it here: cfr-export CHECKPOINT --engine trt -o DIR "
                                  "(or Engine(model.onnx) to run the ONNX graph instead)")
