"""Dead class outputs: how many classes a model can no longer predict after a few epochs.

python experiments/dead_classes.py [--models=squeezenet,squeezenet_torchvision] [--dataset=gtsrb]
    [--width=0.25] [--epochs=4] [--learning_rate=1e-3] [--torch] [--workdir=runs/dead_classes]

Each model of `compax.models.MODELS` trains (`compax.train.fit`, Adam, batch 128, the study's
data and split, one seed) for `epochs` epochs; after every epoch its logits on the validation set
are computed (the weights of that epoch, not the best ones) and a class counts as dead when its
logit is the same on every validation image (max - min < 1e-6). With torchvision's SqueezeNet
head, ReLU(1x1 conv) then the global average, a class whose conv output is negative at every
position of an image gets logit 0 and no gradient from that image; negative for every training
image, it never comes back (constant on the validation images, it still can, through training
images that reach it). With --torch the same
architecture in PyTorch (torch_reference/runners.py, torchvision's SqueezeNet initialisation:
Kaiming-uniform convolutions, classifier N(0, 0.01), zero biases) trains alike on the same
images: the check that the deaths are the architecture's and not compax's. The last line is one
JSON object: per framework and model, per epoch, validation accuracy, classes predicted, dead
classes.
"""

import json
import pathlib
import platform
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from compax.config import study_config
from compax.data import load_dataset
from compax.data.augment import normalize
from compax.models import MODELS, get_model
from compax.train.loop import fit
from compax.train.population import variables_of

_MODELS = flags.DEFINE_list("models", ["squeezenet", "squeezenet_torchvision"], "Models to train.")
_DATASET = flags.DEFINE_enum("dataset", "gtsrb", ["gtsrb", "cifar10"], "Dataset.")
_WIDTH = flags.DEFINE_float("width", 0.25, "Width multiplier of every model.")
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Epochs to train.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam's learning rate.")
_TORCH = flags.DEFINE_bool("torch", False, "Also train the PyTorch twins (needs torch).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/dead_classes", "Where the compax runs train.")


def class_report(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Validation accuracy, number of classes predicted, and classes whose logit is constant."""
    predicted = logits.argmax(-1)
    spread = logits.max(0) - logits.min(0)
    return {"val_accuracy": round(float((predicted == labels).mean()), 4),
            "classes_predicted": int(len(np.unique(predicted))),
            "dead_classes": int((spread < 1e-6).sum())}


def compax_run(name: str, dataset, workdir: pathlib.Path) -> list[dict]:
    """Per epoch, the class report of `name` trained by compax for 1, 2, ..., epochs epochs
    (each call of `fit` resumes from the previous epoch's checkpoint; `workdir / name` is
    scratch, emptied first)."""
    run_dir = workdir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    config = study_config(_DATASET.value, name, "paper")
    config.model_width, config.learning_rate, config.progress = _WIDTH.value, _LR.value, False
    model = get_model(name, dataset.num_classes, _WIDTH.value)
    images = normalize(jnp.asarray(dataset.val.images), dataset.mean, dataset.std)
    apply = jax.jit(lambda variables: model.apply(variables, images))
    reports = []
    for epoch in range(1, _EPOCHS.value + 1):
        config.max_epochs = epoch
        state = fit(config, dataset, run_dir, progress=False).state  # the last epoch's weights
        variables = jax.tree.map(lambda a: a[0], variables_of(state.params, state.batch_stats))
        reports.append(class_report(np.asarray(apply(variables)), dataset.val.labels))
        print(f"compax {name} epoch {epoch}: {reports[-1]}", flush=True)
    return reports


def torch_run(name: str, dataset) -> list[dict]:
    """The same with the PyTorch twin (torchvision's initialisation), seed 0."""
    import torch
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root
    from torch_reference.runners import torch_model

    torch.manual_seed(0)
    model = torch_model(name, _WIDTH.value, dataset.num_classes, torchvision_init=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=_LR.value)
    mean = torch.tensor(dataset.mean).view(1, 3, 1, 1)
    std = torch.tensor(dataset.std).view(1, 3, 1, 1)

    def tensor(images):
        return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std

    train_x, train_y = tensor(dataset.train.images), torch.from_numpy(dataset.train.labels).long()
    val_x = tensor(dataset.val.images)
    batch = 128
    reports = []
    for epoch in range(1, _EPOCHS.value + 1):
        model.train()
        order = torch.randperm(len(train_x))
        for step in range(len(train_x) // batch):
            index = order[step * batch:(step + 1) * batch]
            loss = torch.nn.functional.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(val_x[i:i + 1000]) for i in range(0, len(val_x), 1000)])
        reports.append(class_report(logits.numpy(), dataset.val.labels))
        print(f"torch {name} epoch {epoch}: {reports[-1]}", flush=True)
    return reports


def main(argv):
    del argv
    unknown = sorted(set(_MODELS.value) - set(MODELS))
    if unknown:
        raise app.UsageError(f"unknown models {unknown}: choose from {', '.join(sorted(MODELS))}")
    dataset = load_dataset(_DATASET.value)
    results = {"dataset": _DATASET.value, "width": _WIDTH.value, "learning_rate": _LR.value,
               "machine": f"{platform.processor() or platform.machine()}, {jax.device_count()} "
                          f"{jax.default_backend()} device(s)", "compax": {}, "torch": {}}
    for name in _MODELS.value:
        results["compax"][name] = compax_run(name, dataset, pathlib.Path(_WORKDIR.value))
        if _TORCH.value:
            results["torch"][name] = torch_run(name, dataset)
    print(json.dumps(results))


if __name__ == "__main__":
    app.run(main)
