"""The population engine: members vmapped in chunks and sharded over devices, batched prediction.

Training (`compax.train`), compression (`compax.compress`, `compax.compress_population`) and the
analyses (`compax.measure`, `compax.analyse_population`) all run their per-member functions through
this module; none of them imports another's internals. A population is any pytree whose arrays
have a leading member axis (variables, a `Compressed` variant, a training state).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh

from compax.data import normalize
from compax.distributed import (
    POPULATION,
    default_mesh,
    free_device_bytes,
    member_sharding,
    members_per_device_that_fit,
    pad_members,
    population_devices,
    replicate,
    shard_batch,
    shard_members,
    to_host,
)


def population_chunk(requested: int, size: int, mesh: Mesh | None = None) -> int:
    """How many members one vmap holds (`chunked_vmap`); 0 means automatic.

    Automatic: the whole population on accelerators (where `chunked_vmap` lowers it to what fits
    the device memory); on the CPU one member per device of the mesh's population axis, i.e. one
    at a time on a single CPU, where a LeNet-5 step runs at ~2,600 images/s per member alone but
    ~720 vmapped over 4 members (XLA:CPU turns a vmapped convolution into a grouped one) or looped
    inside the program with `lax.map`. Training chooses its own (`train_chunking`): with the CPU
    convolution kernels taking all members in one call it runs the whole population at once.
    """
    if requested < 0:
        raise ValueError(f"population_chunk must be >= 0, got {requested}")
    if requested == 0:
        mesh = mesh or default_mesh()
        return min(population_devices(mesh), size) if jax.default_backend() == "cpu" else size
    return min(requested, size)


# Members vmapped at a time in a population's train step on one CPU device (`train_chunking`).
CPU_MEMBER_GROUP = 4


def train_chunking(requested: int, size: int, mesh: Mesh | None = None) -> tuple[int, int]:
    """(chunk, group) of a population's train step (`chunked_vmap`); `requested` 0 is automatic.

    `population_chunk`'s chunk, every member of a chunk vmapped at once (group 0), except
    automatic on a single CPU device: the whole population in one program, its members vmapped
    `CPU_MEMBER_GROUP` at a time. A LeNet-5 step of 32 members vmapped at once has buffers of
    hundreds of MB, which glibc maps afresh (mmap) on every call, so that every page of them
    faults on every call (0.7x the images x members/s of a loop over members, on 2 cores); in
    groups of 4 its buffers are reused from call to call, and one program per step replaces one
    per member (1.1-1.2x the loop, interleaved timings on a loaded 2-core AMD EPYC).
    """
    mesh = mesh or default_mesh()
    if requested == 0 and jax.default_backend() == "cpu" and population_devices(mesh) == 1:
        return size, min(CPU_MEMBER_GROUP, size)
    return population_chunk(requested, size, mesh), 0


def chunked_vmap(fn, chunk: int, num_member_args: int, mesh: Mesh | None = None, group: int = 0):
    """`fn` vmapped over the members of its first `num_member_args` arguments, in chunks, sharded.

    The other arguments are shared by all members and copied to every device of `mesh` (default:
    all devices, `compax.distributed.default_mesh`). Each chunk of `chunk` members is padded to a
    multiple of the mesh's population axis by repeating its last member (the padded outputs are
    dropped), split over that axis with a `NamedSharding` and run as one jit-compiled vmap;
    the chunks are dispatched one after another from the host, so the result is the same for
    every chunk size and every mesh, and a chunk as large as the population on a mesh of one
    device is one plain vmap. With `group` > 0 a chunk's program vmaps `group` of its members at
    a time, one group after another (`lax.map(..., batch_size=group)`): on the CPU this keeps its
    buffers small enough to be reused from one call to the next (`train_chunking`). Outputs
    keep the member sharding (`compax.distributed.to_host` brings them to numpy on multi-host
    runs).

    Where the devices report their memory (GPU, TPU), the first call for each argument shape
    compiles the chunk's program and reads XLA's memory analysis of it; a chunk that would not
    fit in the free device memory is lowered to the members that do
    (`compax.distributed.members_per_device_that_fit`), so a population larger than the devices
    runs in several chunks without setting `population_chunk`.
    """
    mesh = mesh or default_mesh()
    devices = population_devices(mesh)
    in_axes = (0,) * num_member_args
    compiled = {}  # one jitted vmap per number of shared arguments
    fitted = {}  # the chunk that fits device memory, per argument signature
    reports_memory = free_device_bytes(mesh) is not None
    # `count` members from `start`, padded to a multiple of the devices and split over them, in
    # one program per count.
    member_chunk = jax.jit(lambda members, start, count: pad_members(jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, start, count), members), devices),
        static_argnums=2, out_shardings=member_sharding(mesh))
    first_members = jax.jit(lambda out, count: take_members(out, slice(0, count)),
                            static_argnums=1)

    def call(*args):
        members, shared = args[:num_member_args], replicate(args[num_member_args:], mesh)
        if len(shared) not in compiled:
            if group:
                def members_fn(*args):
                    return jax.lax.map(lambda member: fn(*member, *args[num_member_args:]),
                                       args[:num_member_args], batch_size=group)
            else:
                members_fn = jax.vmap(fn, in_axes=in_axes + (None,) * len(shared),
                                      spmd_axis_name=POPULATION)
            compiled[len(shared)] = jax.jit(members_fn)
        batched = compiled[len(shared)]
        size = jax.tree.leaves(members)[0].shape[0]
        step = min(chunk, size)
        if reports_memory:
            signature = (jax.tree.structure(args),
                         tuple((np.shape(x), getattr(x, "dtype", None)) for x in jax.tree.leaves(args)))
            if signature not in fitted:
                fitted[signature] = _chunk_that_fits(batched, members, shared, step, mesh)
            step = fitted[signature]

        def run(start, stop):
            count = stop - start
            if count == size and count % devices == 0:
                part = shard_members(members, mesh)  # no copy when the members are placed already
            else:
                part = member_chunk(members, start, count)
            out = batched(*part, *shared)
            return out if count % devices == 0 else first_members(out, count)

        if step >= size:
            return run(0, size)
        return _concatenate_members([run(i, min(i + step, size)) for i in range(0, size, step)])

    return call


@jax.jit
def _concatenate_members(parts: list):
    """The populations in `parts` (pytrees of one structure) joined along the member axis."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def _chunk_that_fits(batched, members, shared, chunk: int, mesh: Mesh) -> int:
    """`chunk`, or the largest multiple of the population-axis size whose program fits in memory."""
    devices = population_devices(mesh)
    per_device = -(-chunk // devices)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((per_device * devices, *x.shape[1:]), x.dtype,
                                       sharding=member_sharding(mesh)), members)
    stats = batched.lower(*abstract, *shared).compile().memory_analysis()
    need = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes)
    shared_bytes = sum(x.nbytes for x in jax.tree.leaves(shared))
    fit = members_per_device_that_fit(free_device_bytes(mesh), need, shared_bytes, per_device)
    if fit >= per_device:
        return chunk
    logging.info("%d members per device need %.1f MiB, %.1f MiB free: chunks of %d members",
                 per_device, need / 2**20, free_device_bytes(mesh) / 2**20, fit * devices)
    return fit * devices


def take_members(tree, index: int | np.ndarray | slice):
    """The members at `index` (an int: one member; an integer array or slice: several) of a pytree
    with a leading member axis."""
    return jax.tree.map(lambda x: x[index], tree)


def put_members(tree, index: np.ndarray, part):
    """`tree` with the members at `index` replaced by those of `part` (as from `take_members`)."""
    return jax.tree.map(lambda full, new: full.at[index].set(new), tree, part)



def make_predict(apply_fn: Callable, mean: np.ndarray, std: np.ndarray, batch_size: int,
                 chunk: int, mesh: Mesh | None = None) -> Callable:
    """`predict(population, images) -> logits (P, N, classes)`.

    `apply_fn(member, x)` gives one member's logits for normalised images `x`; `population` is
    whatever it takes (variables, a compressed variant, ...) with a leading member axis. Runs in
    fixed-size batches (the last one padded with copies of the last image, so that statistics of
    a batch's extremes, e.g. dynamic quantization's activation ranges, see only real images) so
    that one compiled program serves any N, `chunk`
    members at a time vmapped and split over the devices of `mesh` (`chunked_vmap`), each batch
    over the mesh's `data` axis. The logits come back to this host (from every host, if several).
    """
    mesh = mesh or default_mesh()
    predict_batch = chunked_vmap(
        lambda member, images: apply_fn(member, shard_batch(normalize(images, mean, std), mesh)),
        chunk, num_member_args=1, mesh=mesh)

    def predict(population, images: np.ndarray) -> np.ndarray:
        batches = [predict_batch(population, b) for b in padded_batches(images, batch_size)]
        return np.concatenate([to_host(b) for b in batches], axis=1)[:, :images.shape[0]]

    return predict


def padded_batches(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """`images` in batches of `batch_size`, the last one padded with copies of the last image
    (so that statistics of a batch's extremes see only real images)."""
    pad = (-images.shape[0]) % batch_size
    if pad:
        images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    return [images[i:i + batch_size] for i in range(0, images.shape[0], batch_size)]


def model_apply(model) -> Callable:
    """`apply_fn(variables, x)` of a float model in evaluation mode, for `make_predict`."""
    return lambda variables, x: model.apply(variables, x, train=False)


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-member mean cross-entropy and accuracy of logits (P, N, C) against labels (N,)."""
    logits = jnp.asarray(logits)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)[None])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(labels)[None], axis=-1)
    return np.asarray(loss.mean(-1)), np.asarray(accuracy)
