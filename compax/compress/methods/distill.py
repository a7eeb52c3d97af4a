"""Knowledge distillation (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural
Network") as a recipe step: `distill(epochs, patience, learning_rate, select, temperature, alpha)`.

The student is the incoming compressed population, the teacher of member i is member i's own
original float32 model (`Context.original`: a paired design). The student minimises

    L = α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + (1 − α) · CE(y, softmax(z_s)),

batch means, with z_t, z_s the teacher's and the student's logits on the same (augmented) batch,
y the labels and T the temperature. The soft targets' gradient with respect to z_s scales as
1/T², so the factor T² keeps the two terms' relative weight when T changes (Hinton et al.,
section 2). α = 0 is plain retraining on the cross-entropy.

It is `finetune` or `qat` with this loss (`compax.compress.methods.training.Retraining`): after
a pruning step (a float32 population) the student trains masked, its kernels' zeros kept at zero
(`masked_student`); after a `quantize` step it trains its folded float weights through the fake
quantizer and is re-quantized at the end (`quant_aware_student`). The teacher's logits are
computed in every train step from the teacher's weights on the step's batch, in evaluation mode
(no dropout, BatchNorm with its running statistics), without gradient. Validation, early stopping
(on the validation cross-entropy, `select=loss`, or accuracy), checkpoints and TensorBoard
scalars are the retraining's; the training loss in the scalars is L.
"""

import dataclasses
from typing import ClassVar

import flax
import jax
import jax.numpy as jnp
import optax

from compax.compress.methods.training import Retraining, Student, masked_student, quant_aware_student
from compax.compress.registry import Context, Variant, register_step
from compax.errors import UserError
from compax.member_vmap import take_members
from compax.train.population import variables_of
from compax.train.retrain import Trainable


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                      temperature: float, alpha: float) -> jax.Array:
    """Hinton et al.'s loss, batch means: α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) +
    (1 − α)·CE(y, softmax(z_s)) (module doc); `teacher_logits` get no gradient."""
    log_teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature)
    log_student = jax.nn.log_softmax(student_logits / temperature)
    kl = jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1).mean()
    ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels).mean()
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


class _Distilling(Trainable):
    """A student `Trainable` whose loss is `distillation_loss` against a teacher. The member's
    teacher variables travel in `batch_stats` (`{"student": the student's, "teacher": ...}`), so
    that `make_train_step` vmaps them with the member; the teacher's are never changed."""

    def __init__(self, student: Trainable, teacher_model, temperature: float, alpha: float):
        super().__init__(student.model)
        self.student, self.teacher_model = student, teacher_model
        self.temperature, self.alpha = temperature, alpha

    def _student_variables(self, variables):
        return variables_of(variables["params"], variables["batch_stats"]["student"])

    def apply(self, variables, x, train, mutable, rngs):
        logits, updates = self.student.apply(self._student_variables(variables), x, train, mutable,
                                             rngs)
        packed = {"student": updates.get("batch_stats", {}),
                  "teacher": variables["batch_stats"]["teacher"]}
        return logits, {"batch_stats": packed}

    def loss(self, logits, labels, variables, x):
        teacher = self.teacher_model.apply(variables["batch_stats"]["teacher"], x, train=False)
        return distillation_loss(logits, teacher, labels, self.temperature, self.alpha)

    def evaluate(self, variables, x):
        return self.student.evaluate(self._student_variables(variables), x)


@register_step
@dataclasses.dataclass(frozen=True)
class Distill(Retraining):
    """Recipe step `distill`: retraining of the incoming pruned or quantized population on Hinton
    et al.'s loss with each member's original as its teacher (module doc). `temperature` T > 0
    and `alpha` α in [0, 1] (defaults T = 4, α = 0.9, a common setting for CIFAR-sized
    classifiers, e.g. Tian et al. 2020); the other settings are `Retraining`'s."""

    name: ClassVar[str] = "distill"
    temperature: float = 4.0
    alpha: float = 0.9

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.temperature, int | float) or not 0 < self.temperature < float("inf"):
            raise UserError(f"distill: temperature must be a number > 0, got {self.temperature!r}")
        if not isinstance(self.alpha, int | float) or not 0 <= self.alpha <= 1:
            raise UserError(f"distill: alpha must be a number in [0, 1], got {self.alpha!r}")

    def student(self, variant: Variant) -> Student:
        if variant.compressed.qstate is not None:
            return quant_aware_student(variant, self.name)
        return masked_student(variant, self.name)

    def teach(self, student: Student, variant: Variant, ctx: Context) -> Student:
        teacher = ctx.original
        if teacher is None:
            raise UserError("distill needs the trained population as teacher: run it inside a"
                            " population run")
        teacher = jax.tree.map(jnp.asarray, teacher)
        probe = jax.ShapeDtypeStruct((1, *ctx.dataset.train.images.shape[1:]), jnp.float32)
        try:
            jax.eval_shape(lambda v, x: variant.model.apply(v, x, train=False),
                           take_members(teacher, 0), probe)
        except flax.errors.FlaxError:
            raise UserError("distill: the original weights do not fit the incoming model: no"
                            " step that changes the architecture may come before it") from None
        return dataclasses.replace(
            student,
            trainable=_Distilling(student.trainable, variant.model, float(self.temperature),
                                  float(self.alpha)),
            batch_stats={"student": student.batch_stats, "teacher": teacher},
            finish=lambda trained: student.finish(dataclasses.replace(
                trained, batch_stats=trained.batch_stats["student"])))
