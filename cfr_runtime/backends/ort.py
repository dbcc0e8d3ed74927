"""ONNX Runtime backend with IO binding of per-session buffers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..buffers import alloc_buffers
from ..contract import (
    FULL_IMAGE,
    FULL_OUT_BOX,
    FULL_OUT_CHANGED,
    FULL_OUT_NET,
    FULL_OUT_PROBS,
    FULL_PREV,
    INPUT_DISK_ROWS,
    INPUT_IMAGE,
    INPUT_NAMES,
    INPUT_PREV_MASK,
    META_KEY,
    OUTPUT_PROBS,
    Contract,
    check_io,
)
from ..errors import ContractError
from ..full_runner import FullRunner
from ..onnx_file import check_data_file, read_metadata

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def provider_with_options(name: str, model: Path, cuda_graph: bool) -> str | tuple[str, dict]:
    """Provider options for static, single-stream interactive use: CUDA graphs on, TensorRT engines cached
    next to the model (fp16 when the graph is fp16 already carries the precision)."""
    if name == "CUDAExecutionProvider":
        return name, {"enable_cuda_graph": "1" if cuda_graph else "0"}
    if name == "TensorrtExecutionProvider":
        return name, {"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(model.parent / "trt_cache"),
                      "trt_timing_cache_enable": "1", "trt_cuda_graph_enable": "1" if cuda_graph else "0"}
    return name


def _graph_enabled(provider) -> bool:
    return isinstance(provider, tuple) and "1" in (provider[1].get("enable_cuda_graph"),
                                                   provider[1].get("trt_cuda_graph_enable"))


def _without_graph(provider):
    if not isinstance(provider, tuple):
        return provider
    opts = {k: ("0" if k in ("enable_cuda_graph", "trt_cuda_graph_enable") else v) for k, v in provider[1].items()}
    return provider[0], opts


def _contract_from_metadata(meta: dict[str, str], source: str) -> Contract:
    if META_KEY not in meta:
        raise ContractError(
            f"{source}: no '{META_KEY}' metadata; this ONNX file was not written by cfr-export "
            "(export the checkpoint with `cfr-export CHECKPOINT -o DIR`)"
        )
    contract = Contract.from_json(meta[META_KEY], source)
    contract.check_runnable(source)
    return contract


def read_contract(session, source: str) -> Contract:
    contract = _contract_from_metadata(session.get_modelmeta().custom_metadata_map, source)
    check_io(contract, {i.name: i.shape for i in session.get_inputs()},
             {o.name: o.shape for o in session.get_outputs()}, source)
    return contract


def read_contract_from_file(path: Path) -> Contract:
    """The contract of an ONNX file from its metadata, without loading the graph or its weights (ViT-H's are
    2.6 GB), and its external data file checked. Tensor names and shapes are checked against the contract where
    the graph is loaded (ONNX Runtime: `OrtModel`; TensorRT: when its plan is loaded)."""
    meta = read_metadata(path)
    if meta is None:
        raise ContractError(f"{path}: not a readable ONNX file (missing, truncated or not a model)")
    check_data_file(path, meta)
    return _contract_from_metadata(meta, str(path))


class OrtRunner:
    """Buffers bound to an IO binding once. On the CPU provider the binding shares the numpy memory
    (zero-copy); on CUDA/TensorRT providers the tensors are device OrtValues at fixed addresses (which
    ONNX Runtime's CUDA graphs require): a forward uploads disk rows and prev mask, the image only when the
    Session marks it changed, and downloads the probabilities.

    A captured CUDA graph replays the device addresses it was captured with, so each runner of a
    graph-enabled engine has its own graph: `graph_id` goes into the `gpu_graph_id` run option, and two
    Sessions on one Engine never replay each other's buffers."""

    def __init__(self, session, contract: Contract, device: str = "cpu", graph_id: int | None = None,
                 lock=None):
        import onnxruntime as ort

        self._session = session
        self._run_options = None
        self._lock = lock
        if graph_id is not None:
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        bufs = alloc_buffers(contract)
        self.image, self.prev_mask, self.disk_rows = (bufs[n] for n in INPUT_NAMES)
        self._probs = bufs[OUTPUT_PROBS]
        self.image_dirty = True
        self._binding = session.io_binding()
        self._device = device
        if device == "cpu":
            for name in INPUT_NAMES:
                arr = bufs[name]
                self._binding.bind_input(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
            self._binding.bind_output(OUTPUT_PROBS, "cpu", 0, np.float32, list(self._probs.shape),
                                      self._probs.ctypes.data)
            return
        self._dev = {name: ort.OrtValue.ortvalue_from_shape_and_type(list(arr.shape), np.float32, device, 0)
                     for name, arr in bufs.items()}
        for name in INPUT_NAMES:
            self._binding.bind_ortvalue_input(name, self._dev[name])
        self._binding.bind_ortvalue_output(OUTPUT_PROBS, self._dev[OUTPUT_PROBS])
        if graph_id is not None:
            # ONNX Runtime runs a graph-enabled session normally a few times, then captures: do that here,
            # so that a Session's first click is a replay (and capture cost stays out of click latency)
            for _ in range(3):
                self.run()

    def run(self) -> np.ndarray:
        if self._device != "cpu":
            if self.image_dirty:
                self._dev["image"].update_inplace(self.image)
                self.image_dirty = False
            self._dev["prev_mask"].update_inplace(self.prev_mask)
            self._dev[INPUT_DISK_ROWS].update_inplace(self.disk_rows)
        if self._lock is None:
            self._session.run_with_iobinding(self._binding, self._run_options)
        else:  # graph capture and replay on one ORT session are not safe from several threads at once
            with self._lock:
                self._session.run_with_iobinding(self._binding, self._run_options)
        if self._device != "cpu":
            self._probs[...] = self._dev[OUTPUT_PROBS].numpy()
        return self._probs


class NamedBuffers:
    """Tensors of one contract bound by name, allocated from the contract's shapes and dtypes: numpy arrays
    on the CPU provider (the binding reads and writes them in place), device OrtValues otherwise."""

    def __init__(self, specs: dict[str, tuple[tuple, type]], device: str):
        import onnxruntime as ort

        self.device = device
        if device == "cpu":
            self.arrays = {name: np.zeros(shape, dtype) for name, (shape, dtype) in specs.items()}
        else:
            self.arrays = {name: ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, device, 0)
                           for name, (shape, dtype) in specs.items()}

    def bind(self, binding, name: str, output: bool = False, tensor: str | None = None) -> None:
        """Bind buffer `name` as the graph's input/output `tensor` (default: the same name)."""
        buf, tensor = self.arrays[name], tensor or name
        if self.device == "cpu":
            args = (tensor, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            (binding.bind_output if output else binding.bind_input)(*args)
        else:
            (binding.bind_ortvalue_output if output else binding.bind_ortvalue_input)(tensor, buf)

    def write(self, name: str, value: np.ndarray) -> None:
        if self.device == "cpu":
            self.arrays[name][...] = value
        else:
            self.arrays[name].update_inplace(np.ascontiguousarray(value))

    def read(self, name: str) -> np.ndarray:
        """The host array (CPU: the bound buffer itself) or a device-to-host copy."""
        buf = self.arrays[name]
        return buf if self.device == "cpu" else buf.numpy()


class OrtFullRunner(FullRunner):
    """The full-resolution contract on ONNX Runtime: every tensor bound by name once per image size; two IO
    bindings that differ only in which map is `prev_probs` and which is `probs_full` (the ping-pong), so a
    forward is `run_with_iobinding` plus the upload of whichever small tables changed.

    CUDA graphs (device != "cpu" and a session created with `enable_cuda_graph`): each binding has fixed
    buffer addresses and fixed shapes for one image size, so each (size, direction) gets its own
    `gpu_graph_id`; ids are never reused, because buffers of an earlier size are freed on the next one."""

    _next_graph_id = 0  # process-wide: ONNX Runtime keys captured graphs by id per session

    def __init__(self, session, contract: Contract, device: str = "cpu", cuda_graph: bool = False):
        super().__init__(contract)
        self._session, self._device, self._cuda_graph = session, device, cuda_graph and device != "cpu"
        self._bufs: NamedBuffers | None = None

    def _bind(self, image: np.ndarray) -> None:
        import onnxruntime as ort

        h, w = image.shape[1:3]
        c = self.contract
        specs = dict(c.io(h, w))
        maps = (specs.pop(FULL_PREV), specs.pop(FULL_OUT_PROBS))
        specs["map0"], specs["map1"] = maps
        self._bufs = bufs = NamedBuffers(specs, self._device)
        bufs.write(FULL_IMAGE, image)
        self._bindings, self._run_options = [], []
        for cur in (0, 1):
            binding = self._session.io_binding()
            for name in c.input_names():
                if name != FULL_PREV:
                    bufs.bind(binding, name)
            for name in (FULL_OUT_BOX, FULL_OUT_CHANGED, FULL_OUT_NET):
                bufs.bind(binding, name, output=True)
            bufs.bind(binding, f"map{cur}", tensor=FULL_PREV)
            bufs.bind(binding, f"map{1 - cur}", output=True, tensor=FULL_OUT_PROBS)
            self._bindings.append(binding)
            options = ort.RunOptions()
            if self._cuda_graph:
                options.add_run_config_entry("gpu_graph_id", str(OrtFullRunner._next_graph_id))
                OrtFullRunner._next_graph_id += 1
            self._run_options.append(options)

    def _upload(self, names: list[str]) -> None:
        for name in names:
            self._bufs.write(name, self.small[name])

    def _execute(self, cur: int) -> None:
        self._session.run_with_iobinding(self._bindings[cur], self._run_options[cur])

    def _fetch_small(self) -> tuple[np.ndarray, int]:
        return self._bufs.read(FULL_OUT_BOX), int(self._bufs.read(FULL_OUT_CHANGED)[0])

    def _read_map(self, k: int) -> np.ndarray:
        return self._bufs.read(f"map{k}")

    def _write_map(self, k: int, probs: np.ndarray | None) -> None:
        self._bufs.write(f"map{k}", np.zeros(self.shape, np.float32) if probs is None else probs)

    def _read_net(self) -> np.ndarray:
        return self._bufs.read(FULL_OUT_NET)


class OrtBatch:
    """Forwards of several `OrtRunner`s as one call of a graph with a batch axis (`contract.batched`).

    The runners' inputs are copied into one set of stacked buffers (`max_batch` items, allocated on first use)
    and the call binds their first b items: on the CPU provider numpy views bound in place (one IO binding per
    batch size b, no allocation per call); on CUDA/TensorRT providers device tensors of each batch size used,
    each with its own CUDA graph id when the session captures graphs (a graph replays fixed shapes). Each
    runner's probs buffer receives its item, so a Session reads it exactly as after `runner.run()`."""

    def __init__(self, model: OrtModel):
        self._model = model
        self._lock = threading.Lock()  # one stacked buffer set: one batch at a time
        self._host: dict[str, np.ndarray] | None = None
        self._calls: dict[int, tuple] = {}  # b -> (binding, run options, device buffers or None)

    def _binding(self, b: int) -> tuple:
        import onnxruntime as ort

        m = self._model
        if self._host is None:
            shapes = m.contract.batch_shapes(m.contract.max_batch)
            self._host = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        if b not in self._calls:
            binding, options, dev = m.session.io_binding(), None, None
            if m.device == "cpu":
                for name, arr in self._host.items():
                    view = arr[:b]
                    args = (name, "cpu", 0, np.float32, list(view.shape), view.ctypes.data)
                    (binding.bind_output if name == OUTPUT_PROBS else binding.bind_input)(*args)
            else:
                dev = NamedBuffers({n: (s, np.float32) for n, s in m.contract.batch_shapes(b).items()}, m.device)
                for name in INPUT_NAMES:
                    dev.bind(binding, name)
                dev.bind(binding, OUTPUT_PROBS, output=True)
                if m.cuda_graph:
                    options = ort.RunOptions()
                    options.add_run_config_entry("gpu_graph_id", str(m.take_graph_id()))
            self._calls[b] = (binding, options, dev)
        return self._calls[b]

    def run(self, runners: list[OrtRunner]) -> list[np.ndarray]:
        b = len(runners)
        if not 1 <= b <= self._model.contract.max_batch:
            raise ContractError(f"a batch of {b} forwards; this graph takes 1 to {self._model.contract.max_batch}")
        with self._lock:
            binding, options, dev = self._binding(b)
            host = self._host
            for i, runner in enumerate(runners):
                host[INPUT_IMAGE][i] = runner.image[0]
                host[INPUT_PREV_MASK][i] = runner.prev_mask[0]
                host[INPUT_DISK_ROWS][i] = runner.disk_rows[0]
            if dev is not None:
                for name in INPUT_NAMES:
                    dev.write(name, host[name][:b])
            self._model.run_binding(binding, options)
            out = host[OUTPUT_PROBS] if dev is None else dev.read(OUTPUT_PROBS)
            for i, runner in enumerate(runners):
                runner._probs[0] = out[i]
            return [runner._probs for runner in runners]


class OrtModel:
    def __init__(self, path: Path, providers: list | None = None, threads: int | None = None,
                 cuda_graph: bool = True):
        import onnxruntime as ort

        available = ort.get_available_providers()
        wants_gpu = any((p if isinstance(p, str) else p[0]) in GPU_PROVIDERS for p in (providers or available))
        if wants_gpu and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA, cuBLAS and cuDNN from the nvidia-* wheels only when asked to
            ort.preload_dlls()
        chosen = providers
        if providers is None:
            chosen = [p for p in PREFERRED_PROVIDERS if p in available]
            providers = [provider_with_options(p, path, cuda_graph) for p in chosen]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.graph_refused = ""
        check_data_file(path)  # before ONNX Runtime reads it: a missing or altered weights file gets a clear error
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable files
            if not any(_graph_enabled(p) for p in providers):
                raise ContractError(f"{path}: ONNX Runtime cannot load this file: {exc}") from None
            # CUDA graphs need every node on the GPU provider; run without them rather than not at all
            self.graph_refused = str(exc).splitlines()[0][:200]
            providers = [_without_graph(p) for p in providers]
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.contract = read_contract(self.session, str(path))
        self.providers = self.session.get_providers()
        self.device = "cuda" if self.providers[0] in GPU_PROVIDERS else "cpu"
        options = self.session.get_provider_options().get(self.providers[0], {})
        self.cuda_graph = self.device == "cuda" and (options.get("enable_cuda_graph") == "1"
                                                     or options.get("trt_cuda_graph_enable") == "1")
        self._next_graph_id = 0
        self._id_lock = threading.Lock()
        self._run_lock = threading.Lock() if self.cuda_graph else None
        self._batch = OrtBatch(self) if self.contract.batched else None

    def describe(self) -> str:
        text = "onnxruntime " + "+".join(p.replace("ExecutionProvider", "") for p in self.providers)
        if self.device == "cuda":
            text += " + CUDA graph" if self.cuda_graph else " (no CUDA graph"
            text += f": refused, {self.graph_refused})" if self.graph_refused else ("" if self.cuda_graph else ")")
        return text

    def take_graph_id(self) -> int:
        """A CUDA graph id no other runner or batch size uses."""
        with self._id_lock:
            graph_id, self._next_graph_id = self._next_graph_id, self._next_graph_id + 1
        return graph_id

    def run_binding(self, binding, options) -> None:
        if self._run_lock is None:
            self.session.run_with_iobinding(binding, options)
        else:  # graph capture and replay on one ORT session are not safe from several threads at once
            with self._run_lock:
                self.session.run_with_iobinding(binding, options)

    def run_batch(self, runners: list[OrtRunner]) -> list[np.ndarray]:
        """Several runners' forwards as one call (graphs with a batch axis; `Engine.run_batch` splits larger
        batches)."""
        return self._batch.run(runners)

    def new_runner(self) -> OrtRunner | OrtFullRunner:
        """Called under the Engine's lock."""
        if self.contract.full:
            return OrtFullRunner(self.session, self.contract, self.device, self.cuda_graph)
        graph_id = self.take_graph_id() if self.cuda_graph else None
        return OrtRunner(self.session, self.contract, self.device, graph_id, self._run_lock)
