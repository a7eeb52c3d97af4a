"""compax's w8a8 and w4a8 post-training quantization against PyTorch's (fbgemm) on a trained
LeNet-5 or SqueezeNet.

python experiments/compare_torch_ptq.py --workdir=runs/gtsrb_lenet
python experiments/compare_torch_ptq.py --workdir=runs/gtsrb_squeezenet_paper

Restores the trained population of a finished `launch.py` run, quantizes member `--member` with
compax and with `torch.ao.quantization` (eager static PTQ, fbgemm, per-channel weights,
HistogramObserver activations with reduce_range) on the same calibration images as the run, and
prints both test accuracies, the share of test images both predict alike, and the largest logit
difference in output quantization steps, for 8-bit and 4-bit weights (PyTorch's int8 kernels with
its weight observer limited to [-8, 7]). The last line is one JSON object. Needs torch.
"""

import json
import pathlib
import sys

import jax
import ml_collections
from absl import app, flags

from compax.compress_population import calibration_images
from compax.data import load_dataset, normalize
from compax.member_vmap import take_members
from compax.train import fit

# The PyTorch reference models live with the tests (test-only code, outside the package).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from torch_reference.quantization import compare_with_torch_ptq  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a finished LeNet-5 or SqueezeNet run.",
                                required=True)
_MEMBER = flags.DEFINE_integer("member", 0, "Population member to quantize.")


def main(argv):
    del argv
    workdir = pathlib.Path(_WORKDIR.value)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    config.progress = False
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, split_seed=config.split_seed,
                           val_fraction=config.val_fraction)
    trained = fit(config, dataset, workdir, progress=False)  # restores the finished run
    variables = take_members(trained.variables, _MEMBER.value)
    report = {"workdir": str(workdir), "seed": int(trained.seeds[_MEMBER.value])}
    for bits in (8, 4):
        report[f"w{bits}a8"] = compare_with_torch_ptq(
            trained.model, jax.device_get(variables), calibration_images(config, dataset),
            normalize(dataset.test.images, dataset.mean, dataset.std), dataset.test.labels,
            weight_bits=bits)
        print(f"w{bits}a8:")
        for key, value in report[f"w{bits}a8"].items():
            print(f"  {key:>22}: {value}")
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
