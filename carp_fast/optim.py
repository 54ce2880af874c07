"""LARS with multi-tensor kernels, its parameter groups, and the per-step schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For every parameter ``w`` with gradient ``g`` that is not 1-D (weights of convs and
    linears):

        d = g + weight_decay * w
        d = d * (eta * ||w|| / ||d||)      when both norms are > 0, else unchanged
        m = momentum * m + d
        w = w - lr * m

    1-D parameters (biases, BatchNorm affine, the weight-norm gain) get neither weight
    decay nor adaptation: ``d = g``. Each group is updated with a handful of
    ``torch._foreach_*`` kernels and no host synchronisation.

    ``step(apply_update=t)`` with a 0-d tensor ``t`` (1: apply, 0: skip) skips the update on the
    device, so a step with a non-finite loss can be dropped without the host reading a
    flag: parameters and momentum stay as they were. The gradients must be finite then
    (the trainer zeroes them on a skipped step).
    """

    def __init__(
        self,
        params,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"invalid LARS settings: lr={lr}, weight_decay={weight_decay}, "
                f"momentum={momentum}, trust_coefficient={trust_coefficient}"
            )
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None, apply_update: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            adapted = [p for p in params if p.ndim > 1]
            plain = [p for p in params if p.ndim <= 1]
            updates = []
            if adapted:
                updates += self._adapted_updates(adapted, group)
            if plain:
                updates += [p.grad for p in plain]
            ordered = adapted + plain
            buffers = []
            for p in ordered:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(state["momentum_buffer"])
            if apply_update is None:
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, updates)
                torch._foreach_add_(ordered, buffers, alpha=-group["lr"])
                continue
            # Skippable form, a = apply_update: m = (a*mu + 1 - a) * m + a*d; w -= lr * a * m.
            apply_f = apply_update.to(buffers[0].dtype)
            torch._foreach_mul_(updates, apply_f)
            torch._foreach_mul_(buffers, apply_f * group["momentum"] + (1 - apply_f))
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(ordered, torch._foreach_mul(buffers, apply_f), alpha=-group["lr"])
        return loss

    @staticmethod
    def _adapted_updates(params: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        grads = [p.grad for p in params]
        if group["weight_decay"] != 0:
            updates = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        else:
            updates = [g.clone() for g in grads]
        param_norms = torch.stack(torch._foreach_norm(params))
        update_norms = torch.stack(torch._foreach_norm(updates))
        # The trust ratio stays on the device: one where() over all layers, no .item().
        ratio = torch.where(
            (param_norms > 0) & (update_norms > 0),
            group["trust_coefficient"] * param_norms / update_norms,
            torch.ones_like(param_norms),
        )
        torch._foreach_mul_(updates, list(ratio.to(updates[0].dtype).unbind()))
        return updates


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups: weights (decayed, adapted) and 1-D parameters (neither)."""
    decayed, plain = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (plain if param.ndim <= 1 else decayed).append(param)
    return [
        {"params": decayed, "name": "decayed"},
        {"params": plain, "name": "not_decayed", "weight_decay": 0.0},
    ]


def set_hyperparameters(optimizer: LARS, lr: float, weight_decay: float) -> None:
    """Apply this step's schedule values (host floats, so no device sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("name") != "not_decayed":
            group["weight_decay"] = weight_decay


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` at step 0 to ``end`` at ``total_steps``."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


class Schedules:
    """Per-step learning rate, weight decay and teacher momentum, as pure functions of the step.

    ``lr``: linear warm-up from 0 over ``warmup_steps``, then cosine from the peak to
    ``min_lr`` at ``total_steps``. ``weight_decay`` and ``teacher_momentum`` (to 1) are
    cosines over the whole run. Pure functions of the step make resume exact.
    """

    def __init__(
        self,
        peak_lr: float,
        min_lr: float,
        warmup_steps: int,
        total_steps: int,
        weight_decay: float,
        weight_decay_end: float,
        teacher_momentum: float,
    ):
        self.peak_lr = peak_lr
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.weight_decay_start = weight_decay
        self.weight_decay_end = weight_decay_end
        self.teacher_momentum_start = teacher_momentum

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * step / self.warmup_steps
        return cosine(
            step - self.warmup_steps, self.total_steps - self.warmup_steps, self.peak_lr, self.min_lr
        )

    def weight_decay(self, step: int) -> float:
        return cosine(step, self.total_steps, self.weight_decay_start, self.weight_decay_end)

    def teacher_momentum(self, step: int) -> float:
        return cosine(step, self.total_steps, self.teacher_momentum_start, 1.0)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: ``base_lr`` is per 256 images."""
    return base_lr * global_batch / 256


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student`` in one multi-tensor kernel."""
    torch._foreach_lerp_(teacher, student, 1.0 - momentum)
