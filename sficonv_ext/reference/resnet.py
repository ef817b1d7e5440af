"""Published SFIConv-ResNet and its training wrapper (``shared/SPEC.md`` sections 3 and 4).

Module names match the published checkpoints key for key, so a published ``best.pkl`` loads into
:class:`PublishedTrainingWrapper` and a bare-network state_dict into :class:`SFIConvResNet` with
``strict=True``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import FirstSFIConvBR, LastSFIConvB, SFIConvB, SFIConvBR

DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
EXPANSION = 4


class Bottleneck(nn.Module):
    """SFIConv bottleneck of layers 1-3: ``(X_s, X_f)`` in and out (one tensor in when ``First``).

    Quirk kept: in the ``First`` block the residual is SFIC1's output, not the block input.
    """

    expansion = EXPANSION

    def __init__(self, inplanes, planes, stride=1, downsample=None, First=False):
        super().__init__()
        width = planes
        self.first = First
        sfic1 = FirstSFIConvBR if First else SFIConvBR
        self.SFIC1 = sfic1(inplanes, width, kernel_size=(1, 1), padding=0)
        self.SFIC2 = SFIConvBR(width, width, kernel_size=(3, 3), stride=stride)
        self.SFIC3 = SFIConvB(width, planes * EXPANSION, kernel_size=(1, 1), padding=0)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        if self.first:
            res_s, res_f = self.SFIC1(x)
            x_s, x_f = self.SFIC2((res_s, res_f))
        else:
            res_s, res_f = x
            x_s, x_f = self.SFIC2(self.SFIC1((res_s, res_f)))
        x_s, x_f = self.SFIC3((x_s, x_f))
        if self.downsample is not None:
            res_s, res_f = self.downsample((res_s, res_f))
        return F.relu(x_s + res_s), F.relu(x_f + res_f)


class BottleneckLast(nn.Module):
    """First block of layer4: ``(X_s, X_f)`` in, one tensor out (LastSFIConv merges branches)."""

    expansion = EXPANSION

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.SFIC1 = SFIConvBR(inplanes, width, kernel_size=(1, 1), padding=0)
        self.SFIC2 = SFIConvBR(width, width, kernel_size=(3, 3), stride=stride)
        self.SFIC3 = LastSFIConvB(width, planes * EXPANSION, kernel_size=(1, 1), padding=0)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        res_s, res_f = x
        y = self.SFIC3(self.SFIC2(self.SFIC1((res_s, res_f))))
        res = self.downsample((res_s, res_f)) if self.downsample is not None else res_s
        return F.relu(y + res)


class BottleneckOrigin(nn.Module):
    """Ordinary ResNet bottleneck (1x1, 3x3, 1x1), used for the remaining layer4 blocks."""

    expansion = EXPANSION

    def __init__(self, inplanes, planes):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + x)


class SFIConvResNet(nn.Module):
    """The bare published network: ``conv1, bn1, layer1..layer4, fc`` (SPEC section 3)."""

    def __init__(self, layers, num_classes=2):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], stride=1, first=True)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_last_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * EXPANSION, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride, first=False):
        downsample = None
        if stride != 1 or self.inplanes != planes * EXPANSION:
            downsample = nn.Sequential(SFIConvB(self.inplanes, planes * EXPANSION,
                                                kernel_size=(1, 1), stride=stride, padding=0))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, First=first)]
        self.inplanes = planes * EXPANSION
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _make_last_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * EXPANSION:
            downsample = nn.Sequential(LastSFIConvB(self.inplanes, planes * EXPANSION,
                                                    kernel_size=(1, 1), stride=stride, padding=0))
        layers = [BottleneckLast(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * EXPANSION
        layers += [BottleneckOrigin(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


class PublishedTrainingWrapper(nn.Module):
    """The published training wrapper ("MainNet"): what the published train script saves.

    ``rgb_extract_feature`` holds the network's children except its fc (0 conv1, 1 bn1, 2 relu,
    3 maxpool, 4-7 layer1-4, 8 avgpool); ``fc`` is a fresh Linear(2048, num_classes).
    Unlike the published script, each wrapper builds its own network instead of sharing one
    module-level instance between all wrappers.
    """

    def __init__(self, depth=26, num_classes=2):
        super().__init__()
        network = SFIConvResNet(DEPTHS[depth], num_classes=2)
        self.rgb_extract_feature = nn.Sequential(*list(network.children())[:-1])
        self.fc = nn.Linear(512 * EXPANSION, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.rgb_extract_feature(x), 1))


def _bare(depth):
    def build(num_classes=2):
        return SFIConvResNet(DEPTHS[depth], num_classes=num_classes)
    build.__name__ = f"sfi_resnet{depth}"
    build.__doc__ = f"Bare published SFIConv-ResNet-{depth}."
    return build


sfi_resnet26 = _bare(26)
sfi_resnet50 = _bare(50)
sfi_resnet101 = _bare(101)
sfi_resnet152 = _bare(152)
