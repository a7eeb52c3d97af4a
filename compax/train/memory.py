"""Whether a population's training state fits in memory, checked before anything is allocated.

The state of a population (`PopulationState`) holds, per member, the parameters, Adam's two
moments and the best-validation copy of the parameters (plus BatchNorm statistics): about
`STATE_COPIES` x 4 bytes per parameter. It lives in host memory on the CPU and in device memory on
accelerators, for every member at once (chunking bounds the memory of the computation, not of the
state). A population that cannot fit stops with a one-line error instead of a crash deep in XLA.
"""

import math
import pathlib

import jax

from compax.errors import UserError
from compax.models import init_variables

STATE_COPIES = 4  # params, Adam mu, Adam nu, best params


def member_state_bytes(model) -> int:
    """Bytes of one member's training state (float32), from the model's abstract initialisation."""
    variables = jax.eval_shape(lambda k: init_variables(model, k), jax.random.key(0))
    params = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(variables["params"]))
    other = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(
        {k: v for k, v in variables.items() if k != "params"}))
    return STATE_COPIES * params + 2 * other


def available_bytes() -> int | None:
    """Free memory where the state will live: the smallest free device memory on accelerators
    (times the local devices, over which the population is sharded), MemAvailable on the CPU;
    None where unknown."""
    devices = jax.local_devices()
    if jax.default_backend() != "cpu":
        stats = [d.memory_stats() for d in devices]
        if all(s and "bytes_limit" in s for s in stats):
            return len(devices) * min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
        return None
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_population_fits(model, population: int, free: int | None = None) -> None:
    """Raises UserError when `population` members' training state exceeds the free memory."""
    free = available_bytes() if free is None else free
    need = population * member_state_bytes(model)
    if free is not None and need > free:
        gib = 2 ** 30
        raise UserError(f"a population of {population} needs {need / gib:.1f} GiB for its training"
                        f" state but {free / gib:.1f} GiB are free: lower --config.population (at"
                        f" most {free // member_state_bytes(model)} fit) or use more devices")
