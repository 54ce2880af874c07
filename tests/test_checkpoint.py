import os

import pytest
import torch

from carp_fast import checkpoint


def test_atomic_save_round_trip(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 3, "w": torch.arange(4)}, path)
    state = checkpoint.load(path)
    assert state["step"] == 3 and torch.equal(state["w"], torch.arange(4))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1}, path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left"):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        checkpoint.load(path)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")


def test_strip_prefixes():
    plain = checkpoint.strip_prefixes({"module.a.weight": 1, "_orig_mod.b": 2, "c": 3})
    assert plain == {"a.weight": 1, "b": 2, "c": 3}


def test_incompatible_state_dict_names_the_difference():
    model = torch.nn.Linear(3, 4)
    with pytest.raises(checkpoint.CheckpointError, match=r"weight: checkpoint \(5, 3\) vs model \(4, 3\)"):
        checkpoint.check_compatible({"weight": torch.zeros(5, 3), "bias": torch.zeros(4)}, model, "x")
