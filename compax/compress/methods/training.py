"""Training-time compression as recipe steps: gradual magnitude pruning, recovery fine-tuning, QAT.

    gmp(final, begin, end, every, unit, scope, initial, epochs, patience, start, exclude,
        seed_offset, learning_rate)
        Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"): at optimizer
        step t the target sparsity is s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(n Δt))^3 (clipped to
        t_0 <= t <= t_0 + nΔt = `end`), and the masks are recomputed from |w| (all conv and dense
        kernels ranked together, `scope=global`, or each kernel alone, `scope=layer`) at every
        t = t_0 + kΔt and at t = `end`, so the last masks hold exactly round(s_f * n) zeros. As
        TF-MOT's `prune_low_magnitude` with `PolynomialDecay(power=3)`. The sparsity is data, not a
        Python constant: s_f lives in the optimizer state (one per member), the count is traced.
    finetune(epochs, patience, learning_rate, select)
        Recovery fine-tuning after one-shot pruning: masks = the zero entries of the incoming
        kernels, kept at zero while the rest trains (`l1_global(amount=searched)+finetune(epochs=5)`).
    qat(epochs, patience, learning_rate, select)
        Quantization-aware training after a `quantize(...)` step (Jacob et al. 2018): the folded
        float weights train through the straight-through fake quantizer (`compax.compress.quant`).

finetune and qat are one retraining (`Retraining`) with two students (`masked_student`,
`quant_aware_student`) and the cross-entropy as objective; `distill` (methods/distill.py) is the
same with a distillation loss. Common to all: every member i trains with its own streams of seed
`config.seed + i`, for gmp from scratch from the baseline member's initialisation, with Adam at the
step's `learning_rate` (filled in from the run's `learning_rate` when the recipe is parsed with its
config: `Step.config_defaults`) and the run's batch size and augmentation (read from the context),
keeping the weights of its best-validation epoch; candidates are, for the retraining steps, also
the incoming weights (epoch 0: the step never makes validation loss worse),
for gmp only the epochs that end at or after `end` (when the masks hold the final sparsity). The
training itself, its TensorBoard scalars (`<workdir>/tensorboard/<variant>/<step>`) and its per-epoch
checkpoints (`<workdir>/step_checkpoints/<variant>/<step>`: a killed step resumes after its last
finished epoch, a finished one is restored without training) are `compax.train.retrain`'s. Masked
entries are kept at zero by the optimizer (`masked`): their gradients are zeroed before Adam and
their update is -w, so the weight after each step is exactly 0; the masks and the schedule's step
count live in the optimizer state, so they are checkpointed with it. Each step reports in the
variant's info (results.json) under `training.<step>`: optimizer steps, epochs, wall seconds
(compilation included) and training images per second over all members.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from compax.compress.compressed import Compressed
from compax.compress.methods.unstructured import GlobalL1
from compax.compress.paths import is_weight
from compax.compress.prune import global_l1_masks, kernel_masks, layer_l1_masks
from compax.compress.ptq import quantize_weights, quantized_apply
from compax.compress.registry import Context, Step, Variant, register_step
from compax.compress.sparsity import sparsity_report
from compax.errors import UserError
from compax.kernels import conv_cpu
from compax.member_vmap import take_members
from compax.train.population import init_population, variables_of
from compax.train.retrain import SELECT, Trainable, Trained, TrainingRun, train_population


def _is_none(x) -> bool:
    return x is None


def gmp_sparsity(step, initial, final, begin, end):
    """Zhu & Gupta's target sparsity at optimizer step `step` (jnp; every argument may be traced):
    final + (initial - final) * (1 - p)^3 with p = clip((step - begin) / (end - begin), 0, 1)."""
    step = jnp.asarray(step, jnp.float32)
    span = jnp.maximum(jnp.asarray(end - begin, jnp.float32), 1.0)
    p = jnp.clip((step - begin) / span, 0.0, 1.0)
    p = jnp.where(step >= end, 1.0, p)  # begin == end: one pruning step to the final sparsity
    return final + (initial - final) * (1.0 - p) ** 3


def gmp_update_step(step, begin, end, every):
    """Whether the masks are recomputed at optimizer step `step`: begin <= step <= end and
    (step - begin) % every == 0 (TF-MOT's pruning turns), or step == end (the final sparsity)."""
    return (step >= begin) & (step <= end) & (((step - begin) % every == 0) | (step == end))


class MaskedState(NamedTuple):
    """`masked`'s state: optimizer steps taken, the masks (True = kept), the final sparsity and the
    wrapped optimizer's state."""

    count: jax.Array
    masks: Any
    final: jax.Array
    inner: optax.OptState


def masked(inner: optax.GradientTransformation, init_masks, schedule=None) -> optax.GradientTransformation:
    """`inner` restricted to the entries its masks keep; masked-out weights are set to zero.

    `init_masks(params)` gives the first masks (pytree like params, bool for masked kernels, None
    elsewhere). `schedule`, if given, is `(recompute(t), masks_at(params, t, final))`, t = 1 at the
    first update: at every update t where `recompute` holds, the masks become `masks_at` of the
    current weights (before the update). Gradients of masked entries are zeroed before `inner`, and
    their update is -w, so they are exactly 0 after the step.
    """
    def init(params):
        return MaskedState(jnp.zeros((), jnp.int32), init_masks(params), jnp.zeros((), jnp.float32),
                           inner.init(params))

    def update(grads, state, params):
        masks = state.masks
        if schedule is not None:
            recompute, masks_at = schedule
            t = state.count + 1  # the number of this update: 1 at the first
            masks = jax.lax.cond(recompute(t), lambda: masks_at(params, t, state.final),
                                 lambda: state.masks)

        def keep(m, x, other):
            return x if m is None else jnp.where(m, x, other)

        grads = jax.tree.map(lambda m, g: keep(m, g, jnp.zeros_like(g)), masks, grads, is_leaf=_is_none)
        updates, inner_state = inner.update(grads, state.inner, params)
        updates = jax.tree.map(lambda m, u, p: keep(m, u, -p), masks, updates, params, is_leaf=_is_none)
        return updates, MaskedState(state.count + 1, masks, state.final, inner_state)

    return optax.GradientTransformation(init, update)


def zero_masks(params):
    """Masks keeping every kernel entry that is not exactly zero (True = kept)."""
    return kernel_masks(params, lambda kernels: [k == 0 for k in kernels])


def masked_sparsity(params, masks) -> dict:
    """`sparsity_report` averaged over the members of a population."""
    size = jax.tree.leaves(params)[0].shape[0]
    reports = [sparsity_report(take_members(params, i), take_members(masks, i)) for i in range(size)]
    return {
        "fraction_of_weights": float(np.mean([r["fraction_of_weights"] for r in reports])),
        "fraction_of_params": float(np.mean([r["fraction_of_params"] for r in reports])),
        "layers": {n: float(np.mean([r["layers"][n] for r in reports])) for n in reports[0]["layers"]},
    }


def _with_training(info: dict, name: str, stats: dict) -> dict:
    info = dict(info)
    info["training"] = {**info.get("training", {}), name: stats}
    return info


def _check_epochs(name, epochs, patience):
    if not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"{name}: epochs must be an integer >= 1, got {epochs!r}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise UserError(f"{name}: patience must be an integer >= 1 or none, got {patience!r}")


def check_learning_rate(name, learning_rate):
    """A UserError unless `learning_rate` is None (unset) or a finite number > 0."""
    if learning_rate is not None and not (isinstance(learning_rate, int | float)
                                          and 0 < learning_rate < float("inf")):
        raise UserError(f"{name}: learning_rate must be a number > 0, got {learning_rate!r}")


def required_learning_rate(name, learning_rate) -> float:
    """The step's learning rate; None (a recipe parsed without the run's config) is an error."""
    if learning_rate is None:
        raise UserError(f"{name}: no learning_rate: write {name}(learning_rate=...) or parse the"
                        " recipe with the run's config")
    return learning_rate


def _float_model(variant: Variant, name: str):
    if variant.compressed.qstate is not None or variant.compressed.dtype != "float32":
        raise UserError(f"{name} trains a float32 model: put it before quantize or cast")


@register_step
@dataclasses.dataclass(frozen=True)
class GradualMagnitudePruning(Step):
    """Recipe step `gmp`: every member trained with Zhu & Gupta's schedule (module doc).

    `begin`, `end`, `every` are in `unit` (`epochs`: converted to optimizer steps as
    round(x * steps per epoch), so end=8 is the last update of epoch 8; `steps`: updates t counted
    from 1 at the first update; end is at least 1).
    `start=init` (default) trains from scratch, as Hooker et al. train each pruned model, so the
    pruned population is a population of its own (`design` "independent" in the variant's info:
    the analyses test it as an independent sample) and not a retouched baseline; member i uses
    seed `config.seed + seed_offset + i` for its initialisation and data order (`seed_offset` 0:
    the baseline member's, so the two share their start; Hooker et al. seed every level apart,
    e.g. seed_offset=1000). `start=trained` starts from the trained weights instead (`design`
    "paired"). `final` may be `searched` (the run's searched global-L1 level). Parsing with the
    run's config fills in `exclude` (compress.prune_exclude; unfilled: nothing excluded) and
    `learning_rate` (learning_rate; unfilled: a UserError when it trains).
    """

    name: ClassVar[str] = "gmp"
    prunes: ClassVar[bool] = False  # its masks come from training, not from given masks
    config_defaults: ClassVar[dict[str, str]] = {"exclude": "compress.prune_exclude",
                                                 "learning_rate": "learning_rate"}
    final: float | str = 0.9
    begin: float = 1
    end: float = 8
    every: float = 0.5
    unit: str = "epochs"
    scope: str = "global"
    initial: float = 0.0
    epochs: int = 12
    patience: int | None = None
    start: str = "init"
    exclude: str | None = None
    seed_offset: int = 0
    learning_rate: float | None = None

    def __post_init__(self):
        _check_epochs(self.name, self.epochs, self.patience)
        check_learning_rate(self.name, self.learning_rate)
        if not isinstance(self.seed_offset, int) or self.seed_offset < 0:
            raise UserError(f"gmp: seed_offset must be an integer >= 0, got {self.seed_offset!r}")
        if self.final != "searched" and not (isinstance(self.final, int | float) and 0 <= self.final < 1):
            raise UserError(f"gmp: final must be a fraction in [0, 1) or 'searched', got {self.final!r}")
        if not (isinstance(self.initial, int | float) and 0 <= self.initial < 1):
            raise UserError(f"gmp: initial must be a fraction in [0, 1), got {self.initial!r}")
        if self.unit not in ("epochs", "steps"):
            raise UserError(f"gmp: unit must be epochs or steps, got {self.unit!r}")
        if self.scope not in ("global", "layer"):
            raise UserError(f"gmp: scope must be global or layer, got {self.scope!r}")
        if self.start not in ("init", "trained"):
            raise UserError(f"gmp: start must be init or trained, got {self.start!r}")
        for key in ("begin", "end", "every"):
            if not isinstance(getattr(self, key), int | float) or getattr(self, key) < 0:
                raise UserError(f"gmp: {key} must be a number >= 0, got {getattr(self, key)!r}")
        if not self.begin <= self.end or self.every <= 0:
            raise UserError(f"gmp: need begin <= end and every > 0, got begin={self.begin},"
                            f" end={self.end}, every={self.every}")
        if self.unit == "epochs" and self.end > self.epochs:
            raise UserError(f"gmp: end={self.end} epochs is after the last of epochs={self.epochs}")

    def schedule_steps(self, steps_per_epoch: int) -> tuple[int, int, int]:
        """(begin, end, every) in optimizer steps."""
        scale = steps_per_epoch if self.unit == "epochs" else 1
        begin, end = round(self.begin * scale), max(1, round(self.end * scale))
        every = max(1, round(self.every * scale))
        if end > self.epochs * steps_per_epoch:
            raise UserError(f"gmp: end={end} steps is beyond the {self.epochs * steps_per_epoch}"
                            " steps of training: raise epochs or lower end")
        return begin, end, every

    def transform(self, learning_rate: float, steps_per_epoch: int, exclude: str | None):
        """The masked Adam of this schedule (the final sparsity is in its state: `MaskedState.final`)."""
        begin, end, every = self.schedule_steps(steps_per_epoch)
        prune = global_l1_masks if self.scope == "global" else layer_l1_masks

        def masks_at(params, count, final):
            return prune(params, gmp_sparsity(count, self.initial, final, begin, end), exclude=exclude)

        def dense(params):
            return kernel_masks(params, lambda ks: [jnp.zeros(k.shape, bool) for k in ks], exclude)

        return masked(optax.adam(learning_rate), dense,
                      (lambda count: gmp_update_step(count, begin, end, every), masks_at))

    def train(self, model, variables, ctx: Context, final) -> tuple[dict, Any, dict]:
        """(variables, final masks, training info) of the population trained with the schedule;
        `final` is a fraction or an array (P,) of one per member."""
        run = TrainingRun.of(ctx)
        steps_per_epoch = len(run.dataset.train) // run.batch_size
        rate = required_learning_rate(self.name, self.learning_rate)
        tx = self.transform(rate, max(steps_per_epoch, 1), self.exclude)
        size = jax.tree.leaves(variables)[0].shape[0]
        run = dataclasses.replace(run, seed=run.seed + self.seed_offset)
        if self.start == "init":
            state = init_population(model, tx, jnp.arange(size, dtype=jnp.int32) + run.seed)
            params, batch_stats = state.params, state.batch_stats
        else:
            params, batch_stats = variables["params"], variables.get("batch_stats", {})
        opt_state = jax.vmap(tx.init)(params)
        opt_state = opt_state._replace(final=jnp.broadcast_to(jnp.asarray(final, jnp.float32), (size,)))
        _, end, _ = self.schedule_steps(max(steps_per_epoch, 1))
        trained = train_population(
            Trainable(model), tx, params, batch_stats, run, epochs=self.epochs,
            patience=self.patience, identity=self.describe(), learning_rate_note=rate,
            start_candidate=False,
            first_candidate_epoch=-(-end // max(steps_per_epoch, 1)), opt_state=opt_state)
        return (variables_of(trained.params, trained.batch_stats), trained.opt_state.masks,
                trained.info)

    def __call__(self, variant: Variant, ctx: Context) -> Variant:
        _float_model(variant, self.name)
        design = {"design": "independent" if self.start == "init" else "paired"}
        if ctx.abstract:
            return Variant(variant.model, variant.compressed, {**variant.info, **design})
        final = (ctx.searched_sparsity(GlobalL1(exclude=self.exclude)) if self.final == "searched"
                 else float(self.final))
        variables, masks, info = self.train(variant.model, variant.compressed.variables, ctx, final)
        result = {**_with_training(variant.info, self.name, info), **design}
        result["sparsity"] = {"amount": final, **masked_sparsity(variables["params"], masks)}
        return Variant(variant.model, variant.compressed.replace(variables=variables), result)


@dataclasses.dataclass
class Student:
    """How a retraining step trains an incoming variant: the `Trainable` (whose `loss` is the
    objective), the starting params and batch stats (leading member axis), whether kernel zeros
    are kept (`masked`), and `finish(trained) -> Compressed`, the compressed population made of
    the trained weights."""

    trainable: Trainable
    params: Any
    batch_stats: Any
    masked: bool
    finish: Callable[[Trained], Compressed]

    def transform(self, learning_rate: float) -> optax.GradientTransformation:
        """Adam at `learning_rate`, restricted to the nonzero kernel entries if `masked`."""
        adam = optax.adam(learning_rate)
        return masked(adam, zero_masks) if self.masked else adam


def masked_student(variant: Variant, name: str) -> Student:
    """The incoming float32 population trained as it is, its kernels' zero entries kept at zero
    (after a pruning step: recovery fine-tuning)."""
    _float_model(variant, name)
    variables = variant.compressed.variables

    def finish(trained: Trained) -> Compressed:
        return variant.compressed.replace(
            variables={**variables, **variables_of(trained.params, trained.batch_stats)})

    return Student(Trainable(variant.model), variables["params"], variables.get("batch_stats", {}),
                   True, finish)


def quant_aware_student(variant: Variant, name: str) -> Student:
    """The incoming statically quantized population trained through its fake quantizer
    (`_QuantAware`) from the folded float weights, re-quantized per channel at the end (the
    QuantState's weight scales replaced, everything else kept)."""
    compressed = variant.compressed
    qstate = compressed.qstate
    if qstate is None or qstate.config.dynamic:
        raise UserError(f"{name} trains a statically quantized model here: put it right after"
                        " quantize(...) in the recipe")
    start = compressed.variables if variant.float_variables is None else variant.float_variables
    packed = {"model": start.get("batch_stats", {}), "qstate": qstate,
              "rest": {k: v for k, v in start.items() if k not in ("params", "batch_stats")}}

    def finish(trained: Trained) -> Compressed:
        params, scales = jax.vmap(lambda p: quantize_weights(p, qstate.config))(trained.params)
        return compressed.replace(variables={**compressed.variables, "params": params},
                                  qstate=qstate.replace(weight_scale=scales))

    return Student(_QuantAware(variant.model), start["params"], packed, False, finish)


@dataclasses.dataclass(frozen=True)
class Retraining(Step):
    """Settings shared by the steps that retrain an incoming model (`finetune`, `qat`, `distill`):
    `epochs`, early-stopping `patience` (None: keep the best epoch, never stop early),
    `learning_rate` (parsing with the run's config fills in its `learning_rate`) and `select`, the
    validation criterion that picks the kept epoch: `loss` (cross-entropy, as the baseline's early
    stopping) or `accuracy` (on GTSRB LeNet-5 the validation loss of fine-tuned pruned weights
    rose while their accuracy rose, so selecting by loss kept the pruned weights themselves).

    A subclass names how it trains the incoming variant (`student`) and may change the
    objective (`teach`); the training itself is shared: every member from the incoming weights,
    which are the epoch-0 candidate (the step never makes the validation criterion worse)."""

    config_defaults: ClassVar[dict[str, str]] = {"learning_rate": "learning_rate"}
    epochs: int = 5
    patience: int | None = None
    learning_rate: float | None = None
    select: str = "loss"

    def __post_init__(self):
        _check_epochs(self.name, self.epochs, self.patience)
        if self.select not in SELECT:
            raise UserError(f"{self.name}: select must be one of {', '.join(SELECT)}, got"
                            f" {self.select!r}")
        check_learning_rate(self.name, self.learning_rate)

    def student(self, variant: Variant) -> Student:
        """How the incoming variant trains (a UserError if the step cannot train it)."""
        raise NotImplementedError

    def teach(self, student: Student, variant: Variant, ctx: Context) -> Student:
        """The student with the step's objective; retraining's own is the cross-entropy."""
        del variant, ctx
        return student

    def __call__(self, variant: Variant, ctx: Context) -> Variant:
        student = self.student(variant)
        if ctx.abstract:
            return Variant(variant.model, variant.compressed, dict(variant.info))
        rate = required_learning_rate(self.name, self.learning_rate)
        student = self.teach(student, variant, ctx)
        trained = train_population(student.trainable, student.transform(rate), student.params,
                                   student.batch_stats, TrainingRun.of(ctx), epochs=self.epochs,
                                   patience=self.patience, identity=self.describe(),
                                   learning_rate_note=rate, start_candidate=True,
                                   select=self.select)
        info = _with_training(variant.info, self.name, trained.info)
        return Variant(variant.model, student.finish(trained), info)


@register_step
@dataclasses.dataclass(frozen=True)
class FineTune(Retraining):
    """Recipe step `finetune`: masked training of the incoming (pruned) float32 population, the
    masks being its kernels' zero entries (`masked_student`), on the cross-entropy, for `epochs`
    epochs with early stopping on the validation criterion (the incoming weights are the epoch-0
    candidate)."""

    name: ClassVar[str] = "finetune"

    def student(self, variant: Variant) -> Student:
        return masked_student(variant, self.name)


class _QuantAware(Trainable):
    """The PTQ model with its weights fake-quantized from the current float weights at every call
    (per channel, `ptq.quantize_weights`) and activations with the fixed calibrated parameters.
    The member's QuantState travels in `batch_stats` (`{"model": ..., "qstate": ...}`) so that
    `make_train_step` vmaps it with the member; nothing in it changes during training."""

    def evaluate(self, variables, x):
        packed = variables["batch_stats"]
        params, _ = quantize_weights(variables["params"], packed["qstate"].config)
        inner = {**variables_of(params, packed["model"]), **packed["rest"]}
        return quantized_apply(self.model, inner, packed["qstate"], x)

    def apply(self, variables, x, train, mutable, rngs):
        del train, mutable, rngs  # BatchNorm is folded, dropout off: evaluation mode throughout
        with nn.intercept_methods(_xla_convolution):
            logits = self.evaluate(variables, x)
        return logits, {"batch_stats": variables["batch_stats"]}


def _xla_convolution(next_fun, args, kwargs, context):
    """Interceptor: `nn.Conv` calls use XLA's convolution primitive, which the quantization points
    of `interpret.py` need, also inside `make_train_step`'s `cpu_convolutions()`. Entered later, it
    runs innermost (flax runs the last entered interceptor next to the method), so it overrides the
    convolution that `cpu_convolutions` set, and puts it back after the call."""
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, nn.Conv)
            or module.conv_general_dilated_cls is not None
            or module.conv_general_dilated not in (None, conv_cpu.conv_general_dilated)):
        return next_fun(*args, **kwargs)
    previous = module.conv_general_dilated
    object.__setattr__(module, "conv_general_dilated", jax.lax.conv_general_dilated)
    try:
        return next_fun(*args, **kwargs)
    finally:
        object.__setattr__(module, "conv_general_dilated", previous)


@register_step
@dataclasses.dataclass(frozen=True)
class QuantizationAwareTraining(Retraining):
    """Recipe step `qat` (after `quantize`): quantization-aware training of the PTQ population.

    Starts from the PTQ model: BatchNorm folded, activation observers calibrated (their scales and
    zero points are kept fixed throughout), the float weights being the folded float weights the
    quantize step rounded (`Variant.float_variables`; the grid weights if a step in between dropped
    them). Each step re-quantizes the weights per output channel from the current float weights
    (scale max|w| / ((2^b - 1) / 2)) and backpropagates through the straight-through estimator
    (`quant_aware_student`). The result is a Compressed like PTQ's: weights on the grid of their
    new per-channel scales, the QuantState's weight scales replaced, everything else the same.
    Folded BatchNorm means no batch statistics are updated (PyTorch's QAT can keep BatchNorm
    training; this one does not), and the model runs in evaluation mode (no dropout).
    """

    name: ClassVar[str] = "qat"

    def student(self, variant: Variant) -> Student:
        return quant_aware_student(variant, self.name)


def kernel_zero_counts(params) -> list[int]:
    """Exactly-zero kernel entries of every member (for tests and reports)."""
    size = jax.tree.leaves(params)[0].shape[0]
    leaves = [leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params) if is_weight(p, leaf[0])]
    return [int(sum(np.count_nonzero(np.asarray(leaf[i]) == 0) for leaf in leaves)) for i in range(size)]
