"""imgpipe's own small CNN, the default architecture (registered as ``cnn``)."""

from __future__ import annotations

from torch import Tensor, nn


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three conv blocks (conv-BN-ReLU ×2, max-pool) of 32/64/128 channels, global average
    pooling, dropout and a linear head: ~0.29M parameters, ~38M MACs per 32×32 image, so it
    trains in seconds per epoch on two CPU cores.

    The adaptive pooling accepts any input of at least 8×8. ``cifar_stem=False`` makes the
    first conv stride 2, for larger images (≥ 64 px) where full resolution is wasted.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, cifar_stem: bool = True,
                 widths: tuple[int, int, int] = (32, 64, 128), dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for i, width in enumerate(widths):
            stride = 2 if (i == 0 and not cifar_stem) else 1
            layers += _conv_bn_relu(cin, width, stride) + _conv_bn_relu(width, width)
            layers.append(nn.MaxPool2d(2))
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (N, 128)
        return self.fc(self.dropout(x))  # (N, num_classes)
