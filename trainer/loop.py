"""The training loop: ICL or RITM loss, AMP, gradient accumulation, atomic checkpoints, exact resume,
DistributedDataParallel through torchrun, a metrics log and periodic NoC validation."""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import check_input_size, load_model, read_checkpoint, save_checkpoint
from .data.dataset import TrainSet
from .data.sources import EvalSource, open_source
from .data.suem import SuemConfig
from .icl import ICLStep, seed_everything
from .models import arch_config, build_model


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    data: list[str] = field(default_factory=list)
    val: str | None = None
    arch: str = "tiny"
    size: int = 448
    init: str | None = None  # an official or cfr-icl checkpoint to fine-tune from
    steps: int = 1000
    batch_size: int = 8
    accum: int = 1
    lr: float = 5e-5
    iterloss: bool = True
    iter_weights: tuple[float, ...] = (1.0, 2.0, 3.0)
    suem: bool = True
    p_simple: float = 0.5
    p_paste: float = 0.5
    p_image_mix: float = 0.5
    max_points: int = 24
    amp: bool = False
    ckpt_every: int = 200
    keep_every: int = 0  # also keep RUN_DIR/step_N.pth every N steps (0: only last.pth)
    val_every: int = 0
    val_limit: int = 10
    val_max_clicks: int = 20
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    progress: bool = True


def _setup(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if want_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return rank, world, device


def _build(cfg: TrainConfig) -> tuple[torch.nn.Module, dict]:
    if cfg.init:
        model, info = load_model(cfg.init, input_size=cfg.size)
        params = info["params"]
        params["backbone_params"]["img_size"] = [cfg.size, cfg.size]
        return model, params
    params = arch_config(cfg.arch, cfg.size)
    check_input_size(cfg.size, params["backbone_params"]["patch_size"][0])  # as cfr-export and fine-tuning refuse
    return build_model(params), params


def validate(model: torch.nn.Module, cfg: TrainConfig) -> dict:
    from cfr_runtime.evaluate import evaluate_dataset
    from cfr_runtime.session import Session

    from .inference import model_engine

    was_training = model.training
    model.eval()
    engine = model_engine(model, cfg.size, cfg.max_points)
    src = EvalSource(cfg.val)
    result = evaluate_dataset(Session(engine), src.instances[: cfg.val_limit], cfg.val_max_clicks, 0.95)
    model.train(was_training)
    return {"noc": result["noc"], "miou@1": result["miou_per_click"][0], "instances": len(result["instances"])}


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) a training; returns the path of the final checkpoint `model.pth`."""
    rank, world, device = _setup(cfg)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)  # the same initial weights on every rank and every run of this seed
    model, params = _build(cfg)
    model.to(device).train()
    for p in model.unused_parameters():
        p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    start = 0
    last = run / "last.pth"
    if cfg.resume and last.exists():
        _, state, extras = read_checkpoint(last)
        model.load_state_dict(state)
        opt.load_state_dict(extras["optimizer"])
        start = int(extras["step"])
    step_fn = ICLStep(model)
    net = torch.nn.parallel.DistributedDataParallel(step_fn) if world > 1 else step_fn
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda")
    suem = SuemConfig(cfg.p_simple, cfg.p_paste, (1.0, 1.0, 1.0), cfg.p_image_mix) if cfg.suem else SuemConfig.off()
    data = TrainSet([open_source(s) for s in cfg.data], cfg.size, cfg.max_points, suem, seed=cfg.seed)
    if rank == 0 and start == 0:
        _clear_previous_run(run)  # a fresh start: nothing of an earlier run in this folder survives to mix in
    elif rank == 0:
        _trim_metrics(run / "metrics.jsonl", start)  # records a killed run logged after its last checkpoint
    log = (run / "metrics.jsonl").open("a") if rank == 0 else None
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    t0, window = time.perf_counter(), []
    for step in range(start, cfg.steps):
        opt.zero_grad(set_to_none=True)
        for micro in range(cfg.accum):
            data.reseed(step, rank, micro)
            rng = np.random.default_rng([cfg.seed, step, rank, micro, 1])
            torch.manual_seed(hash((cfg.seed, step, rank, micro)) % (1 << 31))
            batch = {k: torch.from_numpy(v).to(device) for k, v in data.batch(cfg.batch_size).items()}
            # DDP all-reduces gradients only on the last micro-batch; no_sync() is a one-shot generator context,
            # so forward and backward share one `with` (entering it twice raised under --accum >= 2)
            skip_sync = world > 1 and micro < cfg.accum - 1
            with net.no_sync() if skip_sync else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                    loss, info = net(batch["image"], batch["target"], batch["points"], rng,
                                     tuple(cfg.iter_weights), cfg.iterloss)
                scaler.scale(loss / cfg.accum).backward()
        scaler.step(opt)
        scaler.update()
        window.append((loss.item(), info["iou"]))
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", iou=f"{info['iou']:.2f}")
        if log is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            losses, ious = zip(*window)
            rec = {"step": done, "loss": float(np.mean(losses)), "train_iou": float(np.mean(ious)),
                   "sec_per_step": (time.perf_counter() - t0) / len(window), "lr": cfg.lr}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            t0, window = time.perf_counter(), []
        if rank == 0 and (done % cfg.ckpt_every == 0 or done == cfg.steps):
            save_checkpoint(last, model, params, meta={"arch": cfg.arch}, optimizer=opt.state_dict(), step=done,
                            train_config=_plain(cfg))
        if rank == 0 and cfg.keep_every and done % cfg.keep_every == 0:
            save_checkpoint(run / f"step_{done}.pth", model, params, meta={"arch": cfg.arch, "steps": done},
                            train_config=_plain(cfg))
        if rank == 0 and cfg.val and cfg.val_every and done % cfg.val_every == 0:
            rec = {"step": done, "val": validate(model, cfg)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if bar is not None:
                noc = rec["val"]["noc"]
                bar.write(f"step {done}: val NoC@85 {noc['0.85']:.2f} NoC@90 {noc['0.9']:.2f}")
    if bar is not None:
        bar.close()
    final = run / "model.pth"
    if rank == 0:
        save_checkpoint(final, model, params, meta={"arch": cfg.arch, "steps": cfg.steps}, train_config=_plain(cfg))
        log.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final


def _clear_previous_run(run: Path) -> None:
    """Remove what an earlier run left in `run` (checkpoints, metrics.jsonl) before a fresh start writes there, so
    that metrics.jsonl holds one run and `--resume` never picks up a stale last.pth. The cfr-train command line
    refuses to get here over an earlier run without --overwrite."""
    for path in [run / "last.pth", run / "model.pth", run / "metrics.jsonl", *run.glob("step_*.pth")]:
        path.unlink(missing_ok=True)


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` (where a resumed run continues), so no step is logged twice;
    a torn last line of a killed run goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(x + "\n" for x in kept))


def _plain(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["iter_weights"] = list(d["iter_weights"])
    return d

