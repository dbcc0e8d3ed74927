"""ONNX Runtime backend with IO binding of per-session buffers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contract import INPUT_NAMES, META_KEY, OUTPUT_PROBS, Contract, check_io
from ..engine import alloc_buffers
from ..errors import ContractError

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def read_contract(session, source: str) -> Contract:
    meta = session.get_modelmeta().custom_metadata_map
    if META_KEY not in meta:
        raise ContractError(
            f"{source}: no '{META_KEY}' metadata; this ONNX file was not written by cfr-export "
            "(export the checkpoint with `cfr-export CHECKPOINT -o DIR`)"
        )
    contract = Contract.from_json(meta[META_KEY], source)
    check_io(contract, {i.name: i.shape for i in session.get_inputs()},
             {o.name: o.shape for o in session.get_outputs()}, source)
    return contract


class OrtRunner:
    """Buffers bound to an IO binding once; CPU binding shares the numpy memory (zero-copy)."""

    def __init__(self, session, contract: Contract):
        self._session = session
        bufs = alloc_buffers(contract)
        self.image, self.prev_mask, self.points = (bufs[n] for n in INPUT_NAMES)
        self._probs = bufs[OUTPUT_PROBS]
        self._binding = session.io_binding()
        for name in INPUT_NAMES:
            arr = bufs[name]
            self._binding.bind_input(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        self._binding.bind_output(OUTPUT_PROBS, "cpu", 0, np.float32, list(self._probs.shape),
                                  self._probs.ctypes.data)

    def run(self) -> np.ndarray:
        self._session.run_with_iobinding(self._binding)
        return self._probs


class OrtModel:
    def __init__(self, path: Path, providers: list | None = None, threads: int | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in PREFERRED_PROVIDERS if p in available]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable files
            raise ContractError(f"{path}: ONNX Runtime cannot load this file: {exc}") from None
        self.contract = read_contract(self.session, str(path))
        self.providers = self.session.get_providers()

    def describe(self) -> str:
        return "onnxruntime " + "+".join(p.replace("ExecutionProvider", "") for p in self.providers)

    def new_runner(self) -> OrtRunner:
        return OrtRunner(self.session, self.contract)
