import argparse
import copy

import pytest
import torch
import torchvision

from carp_fast import checkpoint, export
from carp_fast.config import ModelConfig
from carp_fast.model import CarpModel


def tiny_model(seed=0, **overrides):
    values = dict(arch="resnet18", num_prototypes=64, partition_size=16, hidden_dim=32, bottleneck_dim=16)
    values.update(overrides)
    torch.manual_seed(seed)
    model = CarpModel(ModelConfig(**values))
    # Non-trivial BatchNorm statistics, so a lost buffer would change the features.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def save_carp_fast(model, path, student=None):
    student = student if student is not None else model
    torch.save(
        {"student": student.state_dict(), "teacher": model.state_dict(), "optimizer": {}, "scaler": {},
         "step": 1, "epoch": 0, "config": {"model": {"arch": "resnet18"}}, "rng": {}, "format": "carp_fast/1"},
        path,
    )


def save_published(teacher, student, path, arch="resnet18"):
    """The layout of the released CARP checkpoints: DDP prefixes and the argparse args."""
    torch.save(
        {
            "student": {f"module.{k}": v for k, v in student.state_dict().items()},
            "teacher": {f"module.{k}": v for k, v in teacher.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 400,
            "args": argparse.Namespace(arch=arch, out_dim=64, lr=0.45, global_crops_scale=[0.2, 1.0]),
            "fp16_scaler": {"scale": 1024.0},
        },
        path,
    )


def features_of(model, images):
    """Backbone features in the default memory format (channels-last convs round differently)."""
    backbone = copy.deepcopy(model.backbone).to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        return backbone(images)


def torchvision_from(path, arch="resnet18"):
    net = getattr(torchvision.models, arch)()
    result = net.load_state_dict(export.load_exported(path), strict=False)
    return net, result


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_export_round_trip_into_torchvision(tmp_path, fmt):
    teacher = tiny_model(seed=0)
    student = tiny_model(seed=1)
    save_carp_fast(teacher, tmp_path / "last.pt", student)
    out = tmp_path / f"backbone.{fmt}"
    assert export.main(["--ckpt", str(tmp_path), "--out", str(out)]) == 0
    net, result = torchvision_from(out)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    net.fc = torch.nn.Identity()
    net.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(images), features_of(teacher, images), rtol=0, atol=0)
    # An existing --out is refused, byte for byte intact, unless --overwrite is given.
    before = out.read_bytes()
    assert export.main(["--ckpt", str(tmp_path), "--out", str(out), "--which", "student"]) == 2
    assert out.read_bytes() == before
    # --which student exports the other network.
    assert export.main(["--ckpt", str(tmp_path), "--out", str(out), "--which", "student", "--overwrite"]) == 0
    net, _ = torchvision_from(out)
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(images), features_of(student, images), rtol=0, atol=0)


def test_safetensors_metadata_and_no_pickle(tmp_path):
    from safetensors import safe_open

    save_carp_fast(tiny_model(), tmp_path / "ckpt.pt")
    out = tmp_path / "b.safetensors"
    export.export_backbone(tmp_path / "ckpt.pt", out)
    with safe_open(str(out), framework="pt") as handle:
        meta = handle.metadata()
        assert not any(k.startswith("fc.") for k in handle.keys())
    assert meta["arch"] == "resnet18" and meta["which"] == "teacher"
    # An exported file is itself readable as weights (e.g. for k-NN), arch included.
    weights = checkpoint.read_weights(out)
    assert weights["format"] == checkpoint.BACKBONE_ONLY and weights["arch"] == "resnet18"


def test_timm_loads_the_export(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file

    teacher = tiny_model()
    save_carp_fast(teacher, tmp_path / "ckpt.pt")
    out = tmp_path / "b.safetensors"
    export.export_backbone(tmp_path / "ckpt.pt", out)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    net.load_state_dict(load_file(str(out)), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(images), features_of(teacher, images), rtol=0, atol=0)


def test_published_checkpoint_is_read_with_weights_only(tmp_path):
    teacher, student = tiny_model(seed=0), tiny_model(seed=1)
    path = tmp_path / "checkpoint0399.pth"
    save_published(teacher, student, path)
    weights = checkpoint.read_weights(path)
    assert weights["format"] == checkpoint.PUBLISHED
    assert weights["arch"] == "resnet18" and weights["args"]["lr"] == 0.45
    assert weights["teacher"].keys() == teacher.state_dict().keys()
    backbone = checkpoint.backbone_state_dict(weights, "teacher")
    assert "conv1.weight" in backbone and "layer4.1.bn2.running_var" in backbone
    assert not any(k.startswith(("backbone.", "module.", "fc.", "head.")) for k in backbone)
    # Export and warm start from it.
    out = tmp_path / "b.pth"
    export.export_backbone(path, out)
    net, result = torchvision_from(out)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    fresh_student, fresh_teacher = tiny_model(seed=7), tiny_model(seed=8)
    checkpoint.init_from_weights(path, fresh_student, fresh_teacher)
    for fresh, source in ((fresh_student, student), (fresh_teacher, teacher)):
        for key, value in source.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key


def test_published_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"module.backbone.conv1.weight": torch.zeros(1)}, "hook": copy.deepcopy}, path)
    with pytest.raises(checkpoint.CheckpointError, match="weights_only"):
        checkpoint.read_weights(path)


def test_warm_start_from_a_bare_backbone_keeps_the_head(tmp_path):
    source = tiny_model(seed=0)
    save_carp_fast(source, tmp_path / "ckpt.pt")
    export.export_backbone(tmp_path / "ckpt.pt", tmp_path / "b.safetensors")
    student, teacher = tiny_model(seed=3), tiny_model(seed=3)
    head_before = copy.deepcopy(student.head.state_dict())
    checkpoint.init_from_weights(tmp_path / "b.safetensors", student, teacher)
    assert torch.equal(student.backbone.conv1.weight, source.backbone.conv1.weight)
    assert all(torch.equal(v, student.head.state_dict()[k]) for k, v in head_before.items())


def test_another_architecture_is_a_clear_error(tmp_path, capsys):
    save_published(tiny_model(), tiny_model(), tmp_path / "r18.pth")
    with pytest.raises(checkpoint.CheckpointError) as error:
        export.export_backbone(tmp_path / "r18.pth", tmp_path / "x.pth", arch="resnet50")
    message = str(error.value)
    assert "shape mismatch" in message and "layer1.0.conv1.weight" in message
    assert "these weights are a resnet18 backbone, the model is a resnet50" in message
    assert not (tmp_path / "x.pth").exists()
    # The CLIs say the same and exit 2.
    assert export.main(["--ckpt", str(tmp_path / "r18.pth"), "--out", str(tmp_path / "x.pth"), "--arch", "resnet50"]) == 2
    assert "resnet18 backbone" in capsys.readouterr().err
    # Warm start of a resnet50 run from resnet18 weights.
    with torch.device("meta"):
        big = CarpModel(ModelConfig(arch="resnet50", num_prototypes=64, partition_size=16, hidden_dim=32, bottleneck_dim=16))
    with pytest.raises(checkpoint.CheckpointError, match="resnet18 backbone, the model is a resnet50"):
        checkpoint.init_from_weights(tmp_path / "r18.pth", big, big)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"epoch": 3, "notes": "hello"}, tmp_path / "x.pt")
    with pytest.raises(checkpoint.CheckpointError, match="neither a carp_fast checkpoint"):
        checkpoint.read_weights(tmp_path / "x.pt")
    with pytest.raises(checkpoint.CheckpointError, match="without last.pt"):
        checkpoint.read_weights(tmp_path)
