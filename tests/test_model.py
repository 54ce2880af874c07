import torch

from carp_fast.config import ModelConfig
from carp_fast.loss import draw_partition
from carp_fast.model import CarpModel, PrototypeLayer


def tiny_model_config(**overrides):
    values = dict(arch="resnet18", num_prototypes=96, partition_size=16, hidden_dim=32,
                  bottleneck_dim=8, head_layers=3)
    values.update(overrides)
    return ModelConfig(**values)


def test_student_and_teacher_logit_shapes():
    model = CarpModel(tiny_model_config())
    batch = 3
    global_views = torch.randn(2 * batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    local_views = torch.randn(4 * batch, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    partition = draw_partition(96, 16, 0, 0)
    student = model(global_views, local_views, partition, num_views=6)
    teacher = model(global_views, None, partition, num_views=2)
    assert student.shape == (6, batch, 96)
    assert teacher.shape == (2, batch, 96)


def test_backbone_is_channels_last_and_fc_is_gone():
    model = CarpModel(tiny_model_config())
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(model.backbone.fc, torch.nn.Identity)
    assert model.embed_dim == 512


def test_partition_on_prototype_rows_equals_gathering_logits():
    layer = PrototypeLayer(8, 60)
    layer.weight_g.data.uniform_(0.5, 2.0)
    x = torch.randn(5, 8)
    partition = draw_partition(60, 12, 3, 9)
    grouped = layer(x, partition)
    gathered = layer(x)[:, partition.flatten()]
    torch.testing.assert_close(grouped, gathered, rtol=1e-5, atol=1e-6)


def test_prototype_rows_have_unit_norm_when_frozen():
    layer = PrototypeLayer(8, 20, norm_last_layer=True)
    assert not layer.weight_g.requires_grad
    eye = torch.eye(8)
    weight = layer(eye).T  # row k = effective prototype k
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(20))


def test_published_key_layout():
    keys = CarpModel(tiny_model_config()).state_dict().keys()
    assert "head.last_layer.weight_g" in keys and "head.last_layer.weight_v" in keys
    assert "head.mlp.0.weight" in keys and "head.mlp.1.running_mean" in keys
    assert "backbone.conv1.weight" in keys
    assert not any(k.startswith("backbone.fc") for k in keys)


def test_zero_init_residual():
    model = CarpModel(tiny_model_config())
    assert torch.count_nonzero(model.backbone.layer1[0].bn2.weight) == 0
