"""compax.models' architectures written in PyTorch (NCHW), and compax weights ported into them.

One twin per architecture serves every PyTorch comparison: the benchmarks time compax against it
(`experiments/bench_models.py`, `bench_train.py`, `bench_population.py`), `experiments/
dead_classes.py` trains it, and the tests hold compax's float models, saliency, Grad-CAM and PTQ
against it with the same weights (`torch_twin`, `torch_reference/quantization.py`). PyTorch is imported inside
the functions, so that this module imports without it.

LeNet-5 and SqueezeNet, the two models the study quantizes, are built ready for eager-mode
`torch.ao.quantization`: a QuantStub / DeQuantStub around the network (identities until `prepare`),
each ReLU its own module, each fire's concatenation a `FloatFunctional` (its own observer, as in
torchvision's quantizable models), and two attributes: `fuse_groups` (the conv / linear + ReLU
pairs to fuse) and `points` (the modules whose outputs PTQ quantizes, in compax's order of
quantization points). Their modules are named as compax's parameters (`conv1`, `fire3.expand3x3`,
`fc2`, ...), so `port_params` copies a compax parameter tree in by name: conv kernels HWIO -> OIHW,
dense kernels (in, out) -> (out, in); LeNet-5's feature map is flattened in (C, H, W) order by both.
ResNet-18 and VGG-6 (batch norm) are plain Sequentials for timing, with PyTorch's initialisation.
"""

import numpy as np

from compax.errors import UserError
from compax.models.layers import scaled

LENET_LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")
FIRE_CONVS = ("squeeze", "expand1x1", "expand3x3")


def _lenet5(width: float, classes: int):
    from torch import nn
    from torch.ao import quantization as tq

    c1, c2, h1, h2 = (scaled(c, width) for c in (6, 16, 120, 84))

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.conv1, self.conv2 = nn.Conv2d(3, c1, 5), nn.Conv2d(c1, c2, 5)
            self.fc1, self.fc2, self.fc3 = nn.Linear(25 * c2, h1), nn.Linear(h1, h2), nn.Linear(h2, classes)
            self.relu1, self.relu2, self.relu3, self.relu4 = (nn.ReLU() for _ in range(4))
            self.pool, self.flatten = nn.MaxPool2d(2), nn.Flatten()

        def forward(self, x):
            x = self.pool(self.relu1(self.conv1(self.quant(x))))
            x = self.flatten(self.pool(self.relu2(self.conv2(x))))
            x = self.relu4(self.fc2(self.relu3(self.fc1(x))))
            return self.dequant(self.fc3(x))

    net = LeNet5()
    net.fuse_groups = [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"], ["fc2", "relu4"]]
    net.points = ["quant", *LENET_LAYERS]
    return net


def _squeezenet(width: float, classes: int, classifier_relu: bool, torchvision_init: bool):
    import torch
    from torch import nn
    from torch.ao import quantization as tq

    from compax.models.squeezenet import FIRES, POOL_AFTER

    class Fire(nn.Module):
        def __init__(self, cin, squeeze, expand):
            super().__init__()
            self.squeeze = nn.Conv2d(cin, squeeze, 1)
            self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
            self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)
            for name in FIRE_CONVS:
                setattr(self, f"{name}_relu", nn.ReLU())
            self.cat = torch.ao.nn.quantized.FloatFunctional()

        def forward(self, x):
            s = self.squeeze_relu(self.squeeze(x))
            return self.cat.cat([self.expand1x1_relu(self.expand1x1(s)),
                                 self.expand3x3_relu(self.expand3x3(s))], 1)

    class SqueezeNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            cin = scaled(64, width)
            self.conv1, self.relu1, self.pool = nn.Conv2d(3, cin, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            for i, (squeeze, expand) in enumerate(FIRES):
                setattr(self, f"fire{i + 1}", Fire(cin, scaled(squeeze, width), scaled(expand, width)))
                cin = 2 * scaled(expand, width)
            self.dropout = nn.Dropout(0.5)
            self.classifier = nn.Conv2d(cin, classes, 1)
            self.classifier_relu = nn.ReLU() if classifier_relu else nn.Identity()
            self.average, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()

        def forward(self, x):
            x = self.pool(self.relu1(self.conv1(self.quant(x))))
            for i in range(len(FIRES)):
                x = getattr(self, f"fire{i + 1}")(x)
                x = self.pool(x) if i in POOL_AFTER else x
            x = self.classifier_relu(self.classifier(self.dropout(x)))
            return self.dequant(self.flatten(self.average(x)))

    net = SqueezeNet()
    if torchvision_init:
        for module in net.modules():
            if isinstance(module, nn.Conv2d) and module is not net.classifier:
                nn.init.kaiming_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(net.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(net.classifier.bias)
    fires = [f"fire{i + 1}" for i in range(len(FIRES))]
    net.fuse_groups = [["conv1", "relu1"]] + [
        [f"{fire}.{name}", f"{fire}.{name}_relu"] for fire in fires for name in FIRE_CONVS] + (
        [["classifier", "classifier_relu"]] if classifier_relu else [])
    net.points = ["quant", "conv1"] + [f"{fire}.{name}" for fire in fires
                                       for name in (*FIRE_CONVS, "cat")] + ["classifier"]
    return net


def _conv_bn(cin, cout, kernel, stride=1, padding=0):
    from torch import nn

    return [nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout)]


def _vgg6(width: float, classes: int):
    from torch import nn

    from compax.models.vgg import CONV_CHANNELS, HIDDEN

    layers, cin = [], 3
    for i, channels in enumerate(CONV_CHANNELS):
        layers += [*_conv_bn(cin, scaled(channels, width), 3, padding=1), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if i % 2 == 1 else []
        cin = scaled(channels, width)
    layers.append(nn.Flatten())  # (C, H, W) order; compax flattens (H, W, C): same sizes
    features = [16 * cin, *(scaled(h, width) for h in HIDDEN)]
    for a, b in zip(features, features[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(features[-1], classes))


def _resnet18(width: float, classes: int):
    from torch import nn

    from compax.models.resnet import STAGES

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride, 1), nn.ReLU(),
                                      *_conv_bn(cout, cout, 3, 1, 1))
            self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, 1, stride))
                             if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            return nn.functional.relu(self.body(x) + self.shortcut(x))

    cin = scaled(64, width)
    layers = [*_conv_bn(3, cin, 3, 1, 1), nn.ReLU()]
    for channels, stride in STAGES:
        for block in range(2):
            layers.append(BasicBlock(cin, scaled(channels, width), stride if block == 0 else 1))
            cin = scaled(channels, width)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


_SQUEEZENETS = {"squeezenet": False, "squeezenet_torchvision": True}  # name: classifier_relu
_BUILDERS = {"lenet5": _lenet5, "vgg6": _vgg6, "resnet18": _resnet18}
# The registered models (compax.models.MODELS) with a twin here; a new model gets one by a builder.
TWINS = frozenset({*_SQUEEZENETS, *_BUILDERS})


def torch_model(name: str, width: float, classes: int, torchvision_init: bool = False):
    """The PyTorch twin of the registered model `name` at `width`, PyTorch's layer initialisation;
    for SqueezeNet `torchvision_init` gives torchvision's (and compax's) instead: Kaiming-uniform
    convolutions (a=0), the classifier N(0, 0.01), zero biases."""
    if torchvision_init and name not in _SQUEEZENETS:
        raise UserError(f"torchvision_init is SqueezeNet's, not {name!r}'s")
    if name in _SQUEEZENETS:
        return _squeezenet(width, classes, _SQUEEZENETS[name], torchvision_init)
    if name not in _BUILDERS:
        raise UserError(f"no PyTorch twin of model {name!r}: choose from {', '.join(sorted(TWINS))}")
    return _BUILDERS[name](width, classes)


def port_params(net, params) -> None:
    """Copies a compax parameter tree of convolutions and dense layers into `net` by name, in place:
    each `{"kernel", "bias"}` leaf pair at path a/b goes to `net.get_submodule("a.b")`. Every
    parameterised module of `net` must receive one, at its own shape."""
    import torch
    from torch import nn

    def layers(tree, path=()):
        if "kernel" in tree:
            yield ".".join(path), tree
            return
        for key, sub in tree.items():
            yield from layers(sub, (*path, key))

    ported = set()
    for name, leaf in layers(params):
        try:
            module = net.get_submodule(name)
        except AttributeError:
            raise UserError(f"the PyTorch twin has no layer {name!r}: pass the parameters of the "
                            "model the twin was built for") from None
        kernel = np.asarray(leaf["kernel"], np.float32)
        weight = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T
        if tuple(module.weight.shape) != weight.shape:
            raise UserError(f"layer {name!r}: compax kernel {kernel.shape} does not fit the twin's "
                            f"{tuple(module.weight.shape)}: build the twin at the model's width "
                            "and classes")
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
            module.bias.copy_(torch.from_numpy(np.asarray(leaf["bias"], np.float32)))
        ported.add(name)
    missing = sorted(name for name, module in net.named_modules()
                     if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in ported)
    if missing:
        raise UserError(f"params lack the twin's layers {missing}: pass the variables of the "
                        "same model")


def torch_twin(model, params):
    """The quantizable PyTorch twin of `model` (a compax LeNet5 or SqueezeNet instance) holding
    `params` (its parameter tree), in eval mode."""
    from compax.models.lenet import LeNet5
    from compax.models.squeezenet import SqueezeNet

    if getattr(model, "drop_last_block", False):
        raise UserError("no PyTorch twin of an ablated model (drop_last_block=True)")
    if isinstance(model, LeNet5):
        net = _lenet5(model.width, model.num_classes)
    elif isinstance(model, SqueezeNet):
        net = _squeezenet(model.width, model.num_classes, model.classifier_relu, False)
    else:
        raise UserError(f"no weight-holding PyTorch twin of {type(model).__name__}: LeNet5 or "
                        "SqueezeNet")
    port_params(net, params)
    return net.eval()
