"""Reference models sized for the packaged tasks.

* :func:`resnet_digits`: a CIFAR-style ResNet (3 stages of basic blocks, 16/32/64 channels, projection
  shortcuts where the shape changes); ``depth=20`` is ResNet-20.
* :func:`mobilenetv2_digits`: a MobileNetV2-style network (inverted residuals, depthwise 3x3 convs,
  linear bottlenecks, ReLU6).
* :func:`gpt_shakespeare`: transformers' GPT-2 with a small config; its projections are transformers'
  ``Conv1D``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ResNetDigits", "resnet_digits", "MobileNetV2Digits", "mobilenetv2_digits", "gpt_shakespeare", "build_model"]


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNetDigits(nn.Module):
    """CIFAR-style ResNet: stem 3x3 conv, three stages of ``(depth - 2) / 6`` basic blocks, pool, fc."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth: got {depth!r}; allowed: 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [BasicBlock(c, w, 1 if i == 0 else 2)] + [BasicBlock(w, w, 1) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            c = w
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_digits(depth: int = 20, num_classes: int = 10, in_channels: int = 1) -> ResNetDigits:
    return ResNetDigits(depth, num_classes, in_channels)


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> project 1x1 (linear); residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2Digits(nn.Module):
    """MobileNetV2 shape for small images: ``settings`` rows are (expansion t, channels c, repeats n, stride s)."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 1, stem: int = 16, last: int = 256,
                 settings: tuple[tuple[int, int, int, int], ...] = SETTINGS, dropout: float = 0.1):
        super().__init__()
        feats: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6())]
        c = stem
        for t, ch, n, s in settings:
            for i in range(n):
                feats.append(InvertedResidual(c, ch, s if i == 0 else 1, t))
                c = ch
        feats.append(nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()))
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv2_digits(num_classes: int = 10, in_channels: int = 1) -> MobileNetV2Digits:
    return MobileNetV2Digits(num_classes, in_channels)


def gpt_shakespeare(vocab_size: int, block_size: int = 128, n_layer: int = 4, n_embd: int = 128, n_head: int = 4,
                    dropout: float = 0.1) -> nn.Module:
    """transformers' ``GPT2LMHeadModel`` with a small config (projections are ``Conv1D``)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0,
                     pad_token_id=None, use_cache=False)
    return GPT2LMHeadModel(cfg)


def build_model(name: str, **kwargs) -> nn.Module:
    """A reference model by name: ``resnet_digits``, ``mobilenetv2_digits`` or ``gpt_shakespeare``."""
    builders = {"resnet_digits": resnet_digits, "mobilenetv2_digits": mobilenetv2_digits, "gpt_shakespeare": gpt_shakespeare}
    if name not in builders:
        raise ValueError(f"model: got {name!r}; allowed: one of {', '.join(builders)}")
    return builders[name](**kwargs)
