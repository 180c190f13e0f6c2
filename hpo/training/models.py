"""Model builders driven by `Params`: an MLP for tables, a CNN for images (depth, width,
dropout, norm, residual and init mean the same in both; kernel size and pooling are CNN-only)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hpo.spec.params import Params


def _norm1d(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    return nn.Identity()


class DenseBlock(nn.Module):
    """Linear -> norm -> ReLU -> dropout, with a skip connection when shapes allow it."""

    def __init__(self, n_in: int, n_out: int, p: Params) -> None:
        super().__init__()
        # BatchNorm subtracts the batch mean, so a bias before it has no effect on the output; its
        # gradient is pure rounding noise, which Adam would turn into lr-sized random steps.
        self.linear = nn.Linear(n_in, n_out, bias=p.norm != "batch")
        self.norm = _norm1d(p.norm, n_out)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(p.dropout) if p.dropout > 0 else nn.Identity()
        self.residual = p.residual and n_in == n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.drop(self.act(self.norm(self.linear(x))))
        return x + y if self.residual else y


class MLP(nn.Module):
    def __init__(self, n_in: int, n_out: int, p: Params) -> None:
        super().__init__()
        widths = [n_in] + [p.width] * p.depth
        self.blocks = nn.Sequential(*(DenseBlock(a, b, p) for a, b in zip(widths, widths[1:])))
        self.head = nn.Linear(p.width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(x.flatten(1)))
        return out


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # LayerNorm over (C, H, W), batch-size independent
    return nn.Identity()


class ConvBlock(nn.Module):
    """Conv -> norm -> ReLU (+ skip) -> dropout -> 2x2 pooling while the image is >= 4 pixels."""

    def __init__(self, c_in: int, c_out: int, p: Params, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, p.kernel_size, padding=p.kernel_size // 2, bias=p.norm != "batch")
        self.norm = _norm2d(p.norm, c_out)
        self.act = nn.ReLU()
        self.residual = p.residual and c_in == c_out
        self.drop = nn.Dropout(p.dropout) if p.dropout > 0 else nn.Identity()
        if not pool:
            self.pool: nn.Module = nn.Identity()
        elif p.pooling == "avg":
            self.pool = nn.AvgPool2d(2)
        else:
            self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.act(self.norm(self.conv(x)))
        if self.residual:
            y = y + x
        out: torch.Tensor = self.pool(self.drop(y))
        return out


class CNN(nn.Module):
    """depth conv blocks of `width` channels, then a linear classifier over the last feature map."""

    def __init__(self, input_shape: tuple[int, ...], n_out: int, p: Params) -> None:
        super().__init__()
        channels, height, width = input_shape
        blocks = []
        c_in = channels
        for _ in range(p.depth):
            pool = min(height, width) >= 4
            blocks.append(ConvBlock(c_in, p.width, p, pool))
            if pool:
                height, width = height // 2, width // 2
            c_in = p.width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(p.width * height * width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(x).flatten(1))
        return out


def init_weights(model: nn.Module, scheme: str) -> None:
    """Apply the init scheme to every linear and conv layer; 'default' keeps PyTorch's."""
    if scheme == "default":
        return
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def mlp(params: Mapping[str, Any], input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """The built-in MLP factory: flattens any input."""
    p = params if isinstance(params, Params) else Params.from_mapping(params)
    return MLP(math.prod(input_shape), n_outputs, p)


def cnn(params: Mapping[str, Any], input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """The built-in CNN factory, for images (C x H x W)."""
    p = params if isinstance(params, Params) else Params.from_mapping(params)
    return CNN(input_shape, n_outputs, p)


FACTORIES = {"mlp": mlp, "cnn": cnn}


def build_model(family: str, params: Params | Mapping[str, Any], input_shape: tuple[int, ...],
                n_outputs: int) -> nn.Module:
    """A model from a factory: `mlp`, `cnn`, or the user's `module:function` with the same signature
    `build(params, input_shape, n_outputs) -> nn.Module`. Built-in `init` is applied to every one."""
    values = params.to_dict() if isinstance(params, Params) else dict(params)
    if family in FACTORIES:
        model = FACTORIES[family](values, input_shape, n_outputs)
    else:
        from hpo.spec.user_code import UserCodeError, load

        model = load(family, "model")(values, tuple(input_shape), n_outputs)
        if not isinstance(model, nn.Module):
            raise UserCodeError(f"model: {family} returned a {type(model).__name__}, not a torch.nn.Module")
    init_weights(model, str(values.get("init", "default")))
    return model


def ensemble_mean(outputs: list[torch.Tensor], task: str) -> torch.Tensor:
    """How a cross-validated trial's fold models predict together, for its test score and for the
    model hpo.load_best gives back: the mean output (regression) or the mean predicted
    probability (classification)."""
    if task == "regression":
        return torch.stack(outputs).mean(0)
    return torch.stack([o.softmax(-1) for o in outputs]).mean(0)


class Predictor(nn.Module):
    """A trained model (or a cross-validated trial's k fold models) that takes raw inputs: each
    fold's input scaling is applied exactly as in training, and a regression's outputs
    are put back in the target's units. Classification returns logits for one model and, for an
    ensemble, the log of the mean predicted probability (argmax and softmax read both alike)."""

    def __init__(self, models: list[nn.Module], scalings: list[dict[str, Any]], task: str) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.task = task
        for i, s in enumerate(scalings):
            self.register_buffer(f"x_shift{i}", torch.as_tensor(s["x_shift"]))
            self.register_buffer(f"x_scale{i}", torch.as_tensor(s["x_scale"]))
        self.y = [(float(s.get("y_shift", 0.0)), float(s.get("y_scale", 1.0))) for s in scalings]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, model in enumerate(self.models):
            shift, scale = getattr(self, f"x_shift{i}"), getattr(self, f"x_scale{i}")
            scaled = ((x - shift) / scale).float()  # in x's precision, as the data was scaled
            out: torch.Tensor = model(scaled).float()
            if self.task == "regression":
                out = out * self.y[i][1] + self.y[i][0]
            outs.append(out)
        if len(outs) == 1:
            return outs[0]
        mean = ensemble_mean(outs, self.task)
        return mean if self.task == "regression" else mean.log()
