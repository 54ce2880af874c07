import math

import pytest
import torch
from torch import nn

from carp_fast.optim import LARS, Schedules, cosine, ema_update, param_groups, scaled_lr


def loop_lars_step(params, buffers, lr, wd, momentum, eta):
    """The published per-parameter LARS, as a slow loop."""
    for p, buf in zip(params, buffers):
        g = p.grad
        if p.ndim > 1:
            g = g + wd * p
            pn, un = p.norm(), g.norm()
            if pn > 0 and un > 0:
                g = g * (eta * pn / un)
        buf.mul_(momentum).add_(g)
        p.data.add_(buf, alpha=-lr)


def make_model():
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))


def test_foreach_lars_matches_per_parameter_loop():
    torch.manual_seed(0)
    model, twin = make_model(), make_model()
    twin.load_state_dict(model.state_dict())
    optimizer = LARS(param_groups(model), lr=0.1, weight_decay=1e-3, momentum=0.9, trust_coefficient=0.02)
    buffers = [torch.zeros_like(p) for p in twin.parameters()]
    x = torch.randn(9, 5)
    for step in range(4):
        for net in (model, twin):
            net.zero_grad()
            net(x + step).pow(2).mean().backward()
        optimizer.step()
        # The not-decayed group has weight_decay 0 and 1-D params are never adapted.
        loop_lars_step(list(twin.parameters()), buffers, 0.1, 1e-3, 0.9, 0.02)
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_one_dimensional_parameters_get_no_decay_nor_adaptation():
    bias = nn.Parameter(torch.ones(4))
    optimizer = LARS([{"params": [bias], "weight_decay": 0.5}], lr=1.0, momentum=0.0)
    bias.grad = torch.full((4,), 0.25)
    optimizer.step()
    torch.testing.assert_close(bias.detach(), torch.full((4,), 0.75))


def test_param_groups_split_by_dimension_and_skip_frozen():
    model = make_model()
    model[0].bias.requires_grad_(False)
    decayed, plain = param_groups(model)
    assert all(p.ndim > 1 for p in decayed["params"]) and len(decayed["params"]) == 2
    assert all(p.ndim == 1 for p in plain["params"]) and len(plain["params"]) == 3
    assert plain["weight_decay"] == 0.0


def test_zero_norm_weights_are_not_adapted():
    weight = nn.Parameter(torch.zeros(3, 3))
    optimizer = LARS([weight], lr=1.0, momentum=0.0, trust_coefficient=0.001)
    weight.grad = torch.ones(3, 3)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), -torch.ones(3, 3))


def test_schedules_follow_warmup_then_cosine():
    s = Schedules(peak_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110,
                  weight_decay=0.04, weight_decay_end=0.4, teacher_momentum=0.99)
    assert s.lr(0) == 0.0
    assert s.lr(5) == pytest.approx(0.5)
    assert s.lr(10) == pytest.approx(1.0)
    assert s.lr(60) == pytest.approx(0.55)
    assert s.lr(110) == pytest.approx(0.1)
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(110) == pytest.approx(0.4)
    assert s.teacher_momentum(0) == pytest.approx(0.99)
    assert s.teacher_momentum(55) == pytest.approx(0.995)
    assert s.teacher_momentum(110) == pytest.approx(1.0)
    values = [s.lr(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_cosine_endpoints_and_linear_scaling():
    assert cosine(0, 100, 2.0, 0.0) == 2.0
    assert cosine(50, 100, 2.0, 0.0) == pytest.approx(1.0)
    assert cosine(100, 100, 2.0, 0.0) == pytest.approx(0.0)
    assert scaled_lr(0.45, 2048) == pytest.approx(3.6)
    assert math.isclose(scaled_lr(0.3, 256), 0.3)


def test_ema_update_moves_teacher_towards_student():
    teacher = [torch.zeros(3), torch.ones(2, 2)]
    student = [torch.ones(3), torch.zeros(2, 2)]
    ema_update(teacher, student, momentum=0.9)
    torch.testing.assert_close(teacher[0], torch.full((3,), 0.1))
    torch.testing.assert_close(teacher[1], torch.full((2, 2), 0.9))
    ema_update(teacher, student, momentum=1.0)
    torch.testing.assert_close(teacher[0], torch.full((3,), 0.1))


def test_skipped_step_changes_nothing_and_kept_step_matches_plain():
    torch.manual_seed(1)
    model, twin = make_model(), make_model()
    twin.load_state_dict(model.state_dict())
    opt = LARS(param_groups(model), lr=0.1, weight_decay=1e-3)
    opt_twin = LARS(param_groups(twin), lr=0.1, weight_decay=1e-3)
    x = torch.randn(9, 5)
    for net in (model, twin):
        net(x).pow(2).mean().backward()
    opt.step(apply_update=torch.tensor(1.0))
    opt_twin.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)
    snapshot = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    model(x).pow(2).mean().backward()
    opt.step(apply_update=torch.tensor(0.0))
    for p, before, buf in zip(model.parameters(), snapshot, buffers):
        assert torch.equal(p, before)
        assert torch.equal(opt.state[p]["momentum_buffer"], buf)
