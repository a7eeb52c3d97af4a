"""Populations across devices and hosts: the device mesh, the member-axis sharding, multi-host setup.

A population (a pytree whose leaves have a leading member axis) is spread over a `jax.sharding.Mesh`
with two axes: `population`, over which the members are split, and `data`, over which each member's
batch of images may be split (data parallelism within a member; size 1 unless asked for). Arrays are
placed with `NamedSharding`s and jit-compiled programs follow the data (XLA's SPMD partitioner), so
models and analyses run unchanged on one device, on many, and on many hosts, where every host runs
the same program and feeds its own devices (`jax.distributed`, the multi-controller model).
See docs/distributed.md for the commands of a GPU cluster and a TPU pod slice.
"""

import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from compax.errors import UserError

POPULATION, DATA = "population", "data"

# Set to "1" to call jax.distributed.initialize() where no launcher is detected (`detected_launcher`).
COMPAX_DISTRIBUTED = "COMPAX_DISTRIBUTED"


def population_mesh(data_parallel: int = 1, devices=None) -> Mesh:
    """A mesh of `devices` (default: every device of every host) shaped (population, data).

    The `data` axis has `data_parallel` devices; the `population` axis the rest. Axes are of type
    `Auto`, so sharding propagates through jit-compiled code without annotations in the models.
    """
    devices = list(jax.devices() if devices is None else devices)
    if data_parallel < 1 or len(devices) % data_parallel:
        raise UserError(f"data_parallel={data_parallel} does not divide the {len(devices)} devices:"
                        " choose a divisor of the device count")
    return jax.make_mesh((len(devices) // data_parallel, data_parallel), (POPULATION, DATA),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


@functools.cache
def default_mesh() -> Mesh:
    """The mesh used when none is given: every device on the population axis, no data parallelism."""
    return population_mesh()


def population_devices(mesh: Mesh) -> int:
    """How many devices the population axis of `mesh` has (members are padded to a multiple)."""
    return mesh.shape[POPULATION]


@functools.cache  # one object per mesh: made per leaf on every step otherwise
def member_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (member) axis split over `population`, everything else replicated."""
    return NamedSharding(mesh, P(POPULATION))


@functools.cache
def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of `mesh`."""
    return NamedSharding(mesh, P())


def _in_place(x, sharding: NamedSharding) -> bool:
    """Whether `x` is a jax array placed as `sharding` places it (on a single device: any array
    of that device, whatever its sharding object)."""
    if not isinstance(x, jax.Array):
        return False
    if x.sharding == sharding:
        return True
    devices = sharding.device_set
    return len(devices) == 1 and x.sharding.device_set == devices


def _put(tree, shardings):
    """`tree` (jax or numpy arrays) placed with `shardings` (one per leaf), in one transfer of the
    leaves that do not have their sharding already; those are returned as they are, untouched
    (`jax.device_put` of an array already in place costs ~0.2 ms a leaf on a CPU: 30 ms for the
    157 leaves of a SqueezeNet's training state, on every train step).

    An array that lives on this host only is fed through host memory when its sharding spans
    several hosts: every host holds the same value and places the shards of its own devices.
    """
    def local_to_host(x, sharding):
        if isinstance(x, jax.Array) and x.is_fully_addressable and not sharding.is_fully_addressable:
            return np.asarray(x)
        return x

    leaves, treedef = jax.tree.flatten(tree)
    targets = jax.tree.leaves(shardings)
    moving = [i for i, (x, s) in enumerate(zip(leaves, targets, strict=True)) if not _in_place(x, s)]
    if moving:
        placed = jax.device_put([local_to_host(leaves[i], targets[i]) for i in moving],
                                [targets[i] for i in moving])
        for i, x in zip(moving, placed, strict=True):
            leaves[i] = x
    return jax.tree.unflatten(treedef, leaves)


def pad_members(tree, multiple: int):
    """`tree` with its last member repeated until the member count is a multiple of `multiple`."""
    size = jax.tree.leaves(tree)[0].shape[0]
    pad = (-size) % multiple
    if not pad:
        return tree
    return jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]), tree)


def shard_members(tree, mesh: Mesh):
    """A population pytree placed on `mesh`: leaves whose leading (member) axis divides evenly over
    the population axis are split over it, the others (scalars, uneven counts) are replicated."""
    devices = population_devices(mesh)

    def sharding(x):
        even = np.ndim(x) >= 1 and np.shape(x)[0] % devices == 0
        return member_sharding(mesh) if even else replicated(mesh)

    return _put(tree, jax.tree.map(sharding, tree))


def replicate(tree, mesh: Mesh):
    """Every leaf of `tree` copied to every device of `mesh` (arrays shared by all members)."""
    return _put(tree, jax.tree.map(lambda _: replicated(mesh), tree))


def shard_batch(x: jax.Array, mesh: Mesh) -> jax.Array:
    """Inside a jit-compiled member function: split the batch axis (0) of `x` over the `data` axis.

    Data parallelism within a member: XLA partitions the forward and backward pass over the batch
    and sums the gradients across the `data` devices. Identity when the axis has one device or the
    batch does not divide evenly. Under `jax.vmap(..., spmd_axis_name="population")` (as in
    `chunked_vmap`) the member axis stays on `population`.
    """
    if mesh.shape[DATA] == 1 or x.shape[0] % mesh.shape[DATA]:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(DATA)))


def to_host(tree):
    """Every leaf of `tree` as a numpy array on this host.

    Arrays split over several hosts are gathered first (`process_allgather`, a collective: every
    process must call it at the same point); every process receives the whole value, so the host
    logic that follows (early stopping, reports) agrees across processes.
    """
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(fetch, tree)


def is_main_process() -> bool:
    """True on the process that writes files (process 0; the only one outside multi-host runs)."""
    return jax.process_index() == 0


def detected_launcher(environ: Mapping[str, str]) -> str | None:
    """The multi-process launcher that `environ` announces, or None for a single process.

    "jax": JAX_COORDINATOR_ADDRESS is set (with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a
    launcher below that provides them); "slurm": srun with more than one task; "openmpi": mpirun
    with more than one rank; "tpu": a GKE TPU slice of several hosts (TPU_WORKER_HOSTNAMES or
    TPU_PROCESS_ADDRESSES); "forced": COMPAX_DISTRIBUTED=1 (e.g. `gcloud ... tpu-vm ssh
    --worker=all` on a TPU pod slice, whose hosts JAX finds through the VM's metadata server).
    """
    if environ.get(COMPAX_DISTRIBUTED) == "1":
        return "forced"
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "jax"
    if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu"
    return None


def initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize()` when the environment announces several processes.

    Must run before anything touches a JAX device. Returns whether this is a multi-process run.
    On a single machine without a launcher it does nothing, so it never waits for peers that
    will not come. The coordinator, process count and id come from the launcher (JAX detects
    Slurm, Open MPI and Cloud TPU); with only JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID give them.
    """
    environ = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    launcher = detected_launcher(environ)
    if launcher is None:
        return False
    count, index = environ.get("JAX_NUM_PROCESSES"), environ.get("JAX_PROCESS_ID")
    try:
        jax.distributed.initialize(num_processes=None if count is None else int(count),
                                   process_id=None if index is None else int(index))
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"jax.distributed.initialize() failed under the {launcher} launcher"
                        f" ({str(e).splitlines()[0]}): set JAX_COORDINATOR_ADDRESS=host:port,"
                        " JAX_NUM_PROCESSES and JAX_PROCESS_ID, see docs/distributed.md") from e
    logging.info("process %d of %d (%s), %d local of %d devices", jax.process_index(),
                 jax.process_count(), launcher, jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def free_device_bytes(mesh: Mesh) -> int | None:
    """Bytes still free on the fullest local device of `mesh` (bytes_limit - bytes_in_use), or None
    where the backend does not report memory (the CPU)."""
    free = []
    for device in mesh.local_devices:
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free)


def members_per_device_that_fit(free_bytes: int, program_bytes: int, shared_bytes: int,
                                members_per_device: int, headroom: float = 0.9) -> int:
    """How many members one device can run at once, from a compiled program's memory need.

    A program holding `members_per_device` members per device needs `program_bytes` per device
    (XLA's memory analysis: arguments + outputs + temporaries - aliased buffers), of which
    `shared_bytes` (arguments shared by all members: images, labels) do not grow with the
    members. Each member costs b = (program_bytes - shared_bytes) / members_per_device (its
    parameters, optimizer state, gradients and the activations of its batch), and
    floor((headroom * free_bytes - shared_bytes) / b) members fit, at least 1. The estimate is
    conservative: the population already on the device counts both in the free memory and in
    the program's arguments.
    """
    per_member = max(1.0, (program_bytes - shared_bytes) / members_per_device)
    return max(1, int((headroom * free_bytes - shared_bytes) // per_member))
