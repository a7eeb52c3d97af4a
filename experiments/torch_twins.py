"""compax.models' architectures written in PyTorch, the twins experiments/bench_models.py times
compax against (imported from the scripts' directory; tests/test_models.py checks the SqueezeNet
twins against the flax model with the same weights)."""


def torch_model(name: str, width: float, classes: int, torchvision_init: bool = False):
    """compax.models' architecture `name` at `width` in PyTorch (NCHW), PyTorch's layer
    initialisation; for SqueezeNet `torchvision_init` gives torchvision's (and compax's) instead:
    Kaiming-uniform convolutions (a=0), the classifier N(0, 0.01), zero biases."""
    import torch
    from torch import nn

    if torchvision_init and name not in ("squeezenet", "squeezenet_torchvision"):
        raise ValueError(f"torchvision_init is SqueezeNet's, not {name!r}'s")

    from compax.models.layers import scaled
    from compax.models.resnet import STAGES
    from compax.models.squeezenet import FIRES, POOL_AFTER
    from compax.models.vgg import CONV_CHANNELS, HIDDEN

    def conv_bn(cin, cout, kernel, stride=1, padding=0):
        return [nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout)]

    if name == "lenet5":
        c1, c2 = scaled(6, width), scaled(16, width)
        return nn.Sequential(
            nn.Conv2d(3, c1, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 5), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(25 * c2, scaled(120, width)), nn.ReLU(),
            nn.Linear(scaled(120, width), scaled(84, width)), nn.ReLU(),
            nn.Linear(scaled(84, width), classes))
    if name == "vgg6":
        layers, cin = [], 3
        for i, channels in enumerate(CONV_CHANNELS):
            layers += [*conv_bn(cin, scaled(channels, width), 3, padding=1), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i % 2 == 1 else []
            cin = scaled(channels, width)
        layers.append(nn.Flatten())  # (C, H, W) order; compax flattens (H, W, C): same sizes
        features = [16 * cin, *(scaled(h, width) for h in HIDDEN)]
        for a, b in zip(features, features[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(features[-1], classes))
    if name in ("squeezenet", "squeezenet_torchvision"):
        class Fire(nn.Module):
            def __init__(self, cin, squeeze, expand):
                super().__init__()
                self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
                self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
                self.expand3x3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

            def forward(self, x):
                s = self.squeeze(x)
                return torch.cat([self.expand1x1(s), self.expand3x3(s)], 1)

        cin = scaled(64, width)
        layers = [nn.Conv2d(3, cin, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        for i, (squeeze, expand) in enumerate(FIRES):
            layers.append(Fire(cin, scaled(squeeze, width), scaled(expand, width)))
            cin = 2 * scaled(expand, width)
            layers += [nn.MaxPool2d(2)] if i in POOL_AFTER else []
        classifier = nn.Conv2d(cin, classes, 1)
        if torchvision_init:
            for module in nn.Sequential(*layers).modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
            nn.init.normal_(classifier.weight, 0.0, 0.01)
            nn.init.zeros_(classifier.bias)
        head = [nn.ReLU()] if name == "squeezenet_torchvision" else []
        return nn.Sequential(*layers, nn.Dropout(0.5), classifier, *head, nn.AdaptiveAvgPool2d(1),
                             nn.Flatten())

    if name == "resnet18":
        class BasicBlock(nn.Module):
            def __init__(self, cin, cout, stride):
                super().__init__()
                self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride, 1), nn.ReLU(),
                                          *conv_bn(cout, cout, 3, 1, 1))
                self.shortcut = (nn.Sequential(*conv_bn(cin, cout, 1, stride))
                                 if stride != 1 or cin != cout else nn.Identity())

            def forward(self, x):
                return nn.functional.relu(self.body(x) + self.shortcut(x))

        cin = scaled(64, width)
        layers = [*conv_bn(3, cin, 3, 1, 1), nn.ReLU()]
        for channels, stride in STAGES:
            for block in range(2):
                layers.append(BasicBlock(cin, scaled(channels, width), stride if block == 0 else 1))
                cin = scaled(channels, width)
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))
    raise ValueError(f"no PyTorch twin of model {name!r}")
