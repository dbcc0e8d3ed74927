"""GPU checks for issue 9, run on the lent H100 (`bench/gpu/run_h100.sh` calls it); every result goes to
JSON/text files under --out as soon as it is measured, so a cut-off run keeps what it did.

    python bench/gpu/h100_check.py --out $OUT [--arch vit_base] [--quick]

1. the card: name, versions, measured bf16/fp16 matrix rates;
2. the ViT-B contract graph (batch 2 with flip) per precision: eager, eager with the explicit attention
   chain (the old model), CUDA-graph replays, torch.compile + CUDA graph; achieved TFLOP/s; max |diff| and
   mask agreement against eager fp32 on fresh seeded random inputs;
3. a torch.profiler table of the fp16 eager forward's largest kernels;
4. AOTInductor: compile a small model's package and load it in a child process (the reported crash);
5. two Sessions on one Engine give the masks of two separate Engines (each runner has its own graph).
Runs on CPU too (tiny model, no CUDA parts) so the script is tested before it costs device time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def log(out: Path, name: str, data) -> None:
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=str))
    print(f"== {name}: {json.dumps(data, default=str)[:1500]}", flush=True)


def step(out: Path, name: str, fn):
    t = time.perf_counter()
    try:
        data = fn()
    except Exception as exc:  # a failed step is a result too; the next steps still run
        data = {"error": repr(exc), "traceback": traceback.format_exc()[-3000:]}
    if isinstance(data, dict):
        data["step_seconds"] = round(time.perf_counter() - t, 1)
    log(out, name, data)
    return data


def inputs(size: int, seed: int, device):
    import torch

    from cfr_runtime.contract import Contract
    from export.onnx_export import example_inputs

    ex = example_inputs(Contract(input_size=size), seed, 3, 2)
    return tuple(torch.from_numpy(ex[k]).to(device) for k in ("image", "prev_mask", "disk_rows"))


def time_fn(fn, device, repeats: int = 30) -> float:
    """Median ms of fn() with CUDA events (host clock on CPU)."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def graphed(fn, args):
    """A CUDA graph of fn over static args; returns (replay, output)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*args)
    return g.replay, out


def network(arch: str, size: int, device, quick: bool) -> dict:
    import copy

    import torch

    from bench.gpu_backends import forward_flops
    from export.compiled import compile_graph
    from trainer.models import arch_config, build_model
    from trainer.models import plainvit as pv
    from trainer.models.graph import ContractGraph

    torch.manual_seed(0)
    base = build_model(arch_config(arch, size)).eval()
    flops = forward_flops(base, size)
    res = {"arch": arch, "size": size, "gflop_per_forward": flops / 1e9, "rows": []}
    ref_graph = ContractGraph(copy.deepcopy(base).to(device)).eval()
    cases = [inputs(size, 100 + i, device) for i in range(3)]
    with torch.inference_mode():
        refs = [ref_graph(*c) for c in cases]

    def add(name, fn, ms):
        with torch.inference_mode():
            outs = [fn(*c).float() for c in cases]
        diff = max(float((o - r).abs().max()) for o, r in zip(outs, refs))
        agree = float(np.mean([((o > 0.49) == (r > 0.49)).float().mean().item() for o, r in zip(outs, refs)]))
        row = {"variant": name, "ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "max_abs_diff_vs_fp32": diff,
               "mask_agreement_vs_fp32": agree}
        res["rows"].append(row)
        print(row, flush=True)

    precisions = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if device.type != "cuda":
        precisions = {"fp32": torch.float32}
    for pname, dtype in precisions.items():
        model = copy.deepcopy(base)
        if dtype != torch.float32:
            model.half_precision(dtype)
        graph = ContractGraph(model.to(device)).eval()
        for sdpa in (False, True):
            pv.USE_SDPA = sdpa
            tag = f"eager {pname} {'sdpa' if sdpa else 'explicit-attn'}"
            with torch.inference_mode():
                add(tag, graph, time_fn(lambda g=graph: g(*cases[0]), device))
                if device.type == "cuda":
                    replay, _ = graphed(graph, cases[0])
                    add(tag + " +cudagraph", graph, time_fn(replay, device))
        pv.USE_SDPA = True
        if pname == "fp16" or device.type != "cuda":  # compiled bf16: bench/latency.py
            t = time.perf_counter()
            fn = compile_graph(copy.deepcopy(base).to(device), precision=pname)
            with torch.inference_mode():
                fn(*cases[0])
                compile_s = time.perf_counter() - t
                ms = time_fn(lambda f=fn: f(*cases[0]), device)
                add(f"compiled {pname} (compile {compile_s:.0f} s)", fn, ms)
                if device.type == "cuda":
                    replay, _ = graphed(fn, cases[0])
                    add(f"compiled {pname} +cudagraph", fn, time_fn(replay, device))
        if quick:
            break
    return res


def profile(arch: str, size: int, device) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from trainer.models import arch_config, build_model
    from trainer.models.graph import ContractGraph

    torch.manual_seed(0)
    model = build_model(arch_config(arch, size)).eval()
    if device.type == "cuda":
        model.half_precision()
    graph = ContractGraph(model.to(device)).eval()
    args = inputs(size, 7, device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        for _ in range(3):
            graph(*args)
        with profile(activities=acts) as prof:
            for _ in range(5):
                graph(*args)
            if device.type == "cuda":
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70)
    return {"table": table}


def aoti_load(device) -> dict:
    """Compile a small model's AOTInductor package, then load and run it in a child process."""
    import torch

    from export.aoti import export_aoti
    from trainer.checkpoint import save_checkpoint
    from trainer.models import arch_config, build_model

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    params = arch_config("tiny", 224)
    ckpt = save_checkpoint(tmp / "tiny.pth", build_model(params), params)
    t = time.perf_counter()
    pkg = export_aoti(ckpt, tmp, size=224, precision="fp16" if device.type == "cuda" else "fp32",
                      device=device.type)
    compile_s = time.perf_counter() - t
    code = (
        f"import faulthandler, sys; faulthandler.enable(); sys.path.insert(0, {str(ROOT)!r})\n"
        "from export.aoti import aoti_engine\n"
        "from cfr_runtime.disks import fill_disk_rows\n"
        f"e = aoti_engine({str(pkg)!r}, cuda_graph=False); r = e.new_runner()\n"
        "fill_disk_rows(r.disk_rows, [[100.0, 100.0]], [True], 5, 224)\n"
        "print('probs mean', float(r.run().mean()))\n"
        f"e2 = aoti_engine({str(pkg)!r}, cuda_graph=True); r2 = e2.new_runner()\n"
        "fill_disk_rows(r2.disk_rows, [[100.0, 100.0]], [True], 5, 224)\n"
        "print('graph probs mean', float(r2.run().mean()))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return {"compile_s": compile_s, "returncode": run.returncode, "stdout": run.stdout[-2000:],
            "stderr": run.stderr[-4000:]}


def two_sessions(device) -> dict:
    """Interleaved clicks of two Sessions on one Engine vs the same clicks on two Engines."""
    import torch

    from cfr_runtime import Session
    from trainer.inference import model_engine
    from trainer.models import arch_config, build_model
    from trainer.models.plainvit import PlainVitModel

    def engine() -> object:
        torch.manual_seed(0)
        m: PlainVitModel = build_model(arch_config("tiny", 224)).eval()
        if device.type == "cuda":
            m.half_precision()
        return model_engine(m.to(device), 224, cuda_graph=device.type == "cuda")

    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (300, 400, 3), dtype=np.uint8) for _ in range(2)]
    clicks = [[(int(rng.integers(0, 400)), int(rng.integers(0, 300)), bool(i % 3)) for i in range(6)]
              for _ in range(2)]
    shared = engine()
    a, b = Session(shared), Session(shared)
    sep = [Session(engine()), Session(engine())]
    for s, im in zip((a, b), imgs):
        s.set_image(im)
    for s, im in zip(sep, imgs):
        s.set_image(im)
    worst = 0.0
    for k in range(6):
        for i, s in enumerate((a, b)):
            x, y, p = clicks[i][k]
            s.add_click(x, y, p)
            sep[i].add_click(x, y, p)
            worst = max(worst, float(np.abs(s.probs - sep[i].probs).max()))
    return {"max_abs_diff_shared_vs_separate": worst, "equal": worst == 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="vit_base")
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--quick", action="store_true", help="fp32 only (CPU dry run)")
    ap.add_argument("--steps", default="env,network,profile,aoti,two_sessions")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps.split(",")
    if "env" in steps:
        def env():
            info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
            if device.type == "cuda":
                from bench.gpu_backends import matrix_rate_tflops

                info["name"] = torch.cuda.get_device_name(0)
                info["matrix_rate_tflops"] = {d: matrix_rate_tflops(d) for d in ("bf16", "fp16")}
            return info
        step(args.out, "env", env)
    if "network" in steps:
        step(args.out, f"network_{args.arch}", lambda: network(args.arch, args.size, device, args.quick))
    if "profile" in steps:
        prof = step(args.out, "profile", lambda: profile(args.arch, args.size, device))
        (args.out / "profile.txt").write_text(prof.get("table", str(prof)))
    if "aoti" in steps:
        step(args.out, "aoti_load", lambda: aoti_load(device))
    if "two_sessions" in steps:
        step(args.out, "two_sessions", lambda: two_sessions(device))


if __name__ == "__main__":
    main()
