"""The one loader: official files and ours load; malicious, truncated or foreign files fail clearly."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from cfr_runtime.errors import CheckpointError
from trainer.checkpoint import load_model, read_checkpoint, save_checkpoint
from trainer.models import arch_config, build_model


def test_official_loads_with_loss_placeholder(reference_dir):
    params, state, _ = read_checkpoint(reference_dir / "tiny_s0" / "model.pth")
    assert params["backbone_params"]["embed_dim"] == 64
    assert "loss_decode" not in params["head_params"]
    assert len(state) == 214
    # a plain weights_only load refuses the official file: that is why the restricted allowlist exists
    with pytest.raises(pickle.UnpicklingError):
        torch.load(reference_dir / "tiny_s0" / "model.pth", weights_only=True)


def test_ours_loads_with_plain_weights_only(tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    assert ckpt["config"]["class"] == "isegm.model.is_plainvit_model.PlainVitModel"
    model, info = load_model(tiny_checkpoint)
    assert info["arch"] == "tiny"


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "config": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle.*nothing in the file was executed") as err:
        load_model(path)
    assert "system" in str(err.value)
    assert not marker.exists()


def test_truncated_file(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(cut)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "nope.pth")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x", "y")
    with pytest.raises(CheckpointError):
        load_model(path)
    torch.save({"model": {}}, tmp_path / "mae.pth")
    with pytest.raises(CheckpointError, match="'state_dict' and 'config'"):
        load_model(tmp_path / "mae.pth")


def test_other_architecture(tmp_path):
    path = tmp_path / "hrnet.pth"
    torch.save({"state_dict": {}, "config": {"class": "isegm.model.is_hrnet_model.HRNetModel", "params": {}}}, path)
    with pytest.raises(CheckpointError, match="another architecture.*HRNetModel"):
        load_model(path)


def _resave(src, dst, edit):
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt["state_dict"])
    torch.save(ckpt, dst)


def test_missing_extra_and_misshapen_keys(tiny_checkpoint, tmp_path):
    _resave(tiny_checkpoint, tmp_path / "a.pth", lambda sd: sd.pop("head.conv_seg.weight"))
    with pytest.raises(CheckpointError, match="1 missing.*head.conv_seg.weight"):
        load_model(tmp_path / "a.pth")
    _resave(tiny_checkpoint, tmp_path / "b.pth", lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="1 unexpected.*extra.weight"):
        load_model(tmp_path / "b.pth")
    _resave(tiny_checkpoint, tmp_path / "c.pth", lambda sd: sd.__setitem__("head.conv_seg.bias", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="wrong shape.*head.conv_seg.bias"):
        load_model(tmp_path / "c.pth")


def test_save_is_atomic_and_roundtrips(tmp_path):
    params = arch_config("tiny")
    model = build_model(params)
    path = save_checkpoint(tmp_path / "m.pth", model, params, meta={"step": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]
    loaded, info = load_model(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert info["extras"]["cfr_icl"]["step"] == 3
