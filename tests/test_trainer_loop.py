"""Loss, ICL schedule, and cfr-train end to end: checkpoints for the exporter, exact resume after SIGKILL, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from trainer.icl import icl_loss
from trainer.losses import normalized_focal_loss
from trainer.models import arch_config, build_model


def test_nfl_properties():
    target = torch.tensor([[[[1.0, 0.0], [-1.0, 1.0]]]])
    good = torch.tensor([[[[8.0, -8.0], [0.0, 8.0]]]])
    bad = -good
    assert normalized_focal_loss(good, target).item() < 1e-3 < normalized_focal_loss(bad, target).item()
    # the ignored pixel does not matter
    other = good.clone()
    other[0, 0, 1, 0] = -50
    assert torch.allclose(normalized_focal_loss(good, target), normalized_focal_loss(other, target))
    assert normalized_focal_loss(good, target).shape == (1,)


def _batch(size=96, b=2):
    torch.manual_seed(0)
    target = torch.zeros(b, 1, size, size)
    target[:, :, 20:60, 30:70] = 1
    points = torch.full((b, 8, 3), -1.0)
    points[:, 0] = torch.tensor([40.0, 50.0, 0.0])
    return torch.rand(b, 3, size, size), target, points


def test_icl_weights_and_ritm_baseline():
    net = build_model(arch_config("tiny", 96))
    image, target, points = _batch()
    rng = np.random.default_rng(0)
    one, info = icl_loss(net, image, target, points, rng, weights=(1.0,), iterloss=True)
    assert info["steps"] == 1
    net.eval()
    with torch.no_grad():
        ref = normalized_focal_loss(net(torch.cat([image, torch.zeros_like(image[:, :1])], 1), points), target)
        two, info = icl_loss(net, image, target, points, np.random.default_rng(1), weights=(1.0, 2.0, 3.0),
                             max_steps=1)
    assert torch.allclose(two, ref.mean())
    # three steps with weights (1, 2, 3) give a loss about 6x a single step's at init
    net.train()
    losses = [icl_loss(net, image, target, points, np.random.default_rng(s), weights=(1.0, 2.0, 3.0))
              for s in range(6)]
    three = [loss.item() for loss, info in losses if info["steps"] == 3]
    assert three and all(t > 3 * one.item() for t in three)
    loss, info = icl_loss(net, image, target, points, np.random.default_rng(0), iterloss=False)
    loss.backward()
    assert net.head.conv_seg.weight.grad is not None


def _train_cmd(run_dir, steps, extra=()):
    return [sys.executable, "-m", "trainer.cli", "--data", "synthetic:16", "--run-dir", str(run_dir), "--size", "96",
            "--steps", str(steps), "--batch-size", "2", "--lr", "1e-3", "--threads", "1", "--ckpt-every", "2",
            "--log-every", "1", "--no-progress", *extra]


def _run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_train_export_eval(tmp_path):
    """cfr-train writes a checkpoint that cfr-export consumes unchanged and cfr-eval evaluates."""
    _run(_train_cmd(tmp_path / "run", 4))
    ckpt = tmp_path / "run" / "model.pth"
    assert torch.load(ckpt, weights_only=True)["cfr_icl"]["format"] == 1
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in recs)
    from click.testing import CliRunner

    from export.cli import main as export_main

    res = CliRunner().invoke(export_main, [str(ckpt), "-o", str(tmp_path / "onnx"), "--size", "96"])
    assert res.exit_code == 0, res.output


def test_resume_after_sigkill_is_exact(tmp_path):
    steps = 30
    _run(_train_cmd(tmp_path / "a", steps))
    proc = subprocess.Popen(_train_cmd(tmp_path / "b", steps), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = tmp_path / "b" / "last.pth"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "model.pth").exists(), "the run finished before it could be killed"
    killed_at = torch.load(last, weights_only=True)["step"]
    assert 0 < killed_at < steps
    _run(_train_cmd(tmp_path / "b", steps, ["--resume"]))
    a = torch.load(tmp_path / "a" / "model.pth", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pth", weights_only=True)["state_dict"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst == 0.0, f"resumed run differs from the uninterrupted one by {worst}"
    steps_logged = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged[-1] == steps and max(steps_logged) == steps


def test_ddp_two_cpu_processes(tmp_path):
    """Two gloo ranks with --accum 2: the first micro-batch skips the all-reduce (no_sync), the second syncs."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "-m", "trainer.cli", *_train_cmd(tmp_path / "ddp", 3)[3:], "--device", "cpu", "--accum", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "ddp" / "model.pth").exists()
    steps = [json.loads(x)["step"] for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("bad,message", [(["--steps", "2"], "give at least one --data source (or 'data' in --config)"),
                                         (["--data", "nope:/x", "--steps", "1"], "nope:/x: no such path")])
def test_cli_errors(bad, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "--run-dir", str(tmp_path), *bad], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr == f"cfr-train: error: {message}\n", out.stderr


def test_config_file_amp_and_accumulation(tmp_path):
    """A TOML config drives the run; CLI options override it; bf16 autocast and accumulation run on CPU."""
    cfg = tmp_path / "train.toml"
    cfg.write_text('data = ["synthetic:8"]\nsize = 96\nsteps = 5\nbatch_size = 1\nlr = 1e-3\n'
                   'accum = 2\namp = true\nlog_every = 1\nthreads = 1\n')
    _run([sys.executable, "-m", "trainer.cli", "--config", str(cfg), "--run-dir", str(tmp_path / "r"), "--steps", "2",
          "--no-progress"])
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    saved = torch.load(tmp_path / "r" / "model.pth", weights_only=True)["train_config"]
    assert saved["amp"] and saved["accum"] == 2 and saved["steps"] == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('stepz = 3\n')
    out = subprocess.run([sys.executable, "-m", "trainer.cli", "--config", str(bad)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "unknown config keys" in out.stderr and "Traceback" not in out.stderr


def test_fine_tune_from_official_checkpoint(reference_dir, tmp_path):
    _run([sys.executable, "-m", "trainer.cli", "--init", str(reference_dir / "tiny_d8_s1" / "model.pth"),
          "--data", "synthetic:4", "--run-dir", str(tmp_path), "--size", "224", "--steps", "1", "--batch-size", "1",
          "--threads", "1", "--no-progress"])
    from trainer.checkpoint import load_model

    model, info = load_model(tmp_path / "model.pth")
    assert info["params"]["backbone_params"]["embed_dim"] == 48
