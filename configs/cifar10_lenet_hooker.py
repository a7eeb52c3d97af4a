"""Hooker et al. (2019) as they ran it, on CIFAR-10 LeNet-5 (`compax.config.hooker_config`).

python launch.py --config=configs/cifar10_lenet_hooker.py:members=10 --workdir=runs/cifar10_lenet_hooker
python launch.py --config=configs/cifar10_lenet_hooker.py:members=10,gmp_epochs=60 \
    --workdir=runs/cifar10_lenet_hooker_gmp60   # the gradual populations trained as long as the baseline

30 members per level by default; the issue asks for at least 10 on the CPU. The gradual recipe's
12 epochs leave CIFAR-10 under-trained (sessions 6 and 8); `gmp_epochs=60` trains each gradual
population with the baseline's budget and early stopping.
"""

from compax.config import hooker_config


def get_config(arg: str = ""):
    return hooker_config("cifar10", arg)
