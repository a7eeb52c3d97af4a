"""Compression steps registered by name, and variants as recipes of steps.

A compression method is one `Step`: a frozen dataclass whose fields are its settings (with
defaults), registered with `@register_step`. A variant is a recipe, an ordered list of steps with
their settings, written as text:

    l1_global(amount=searched)+quantize(weight_bits=8,activation_bits=8)

Steps run one after another on a whole population (`Variant`: the flax module that evaluates it
and a `Compressed` pytree with a leading member axis), so every step sees what the earlier ones
made. `RECIPES` names the studies' variants; a config adds its own as `name=recipe` entries of
`compress.variants` (see `compax/config.py`). Everything named in a config is checked against the
registry before any stage runs (`check_recipe`).

The shape follows optax's transforms (small pure pieces composed in order) and jaxpruner's
`ALGORITHM_REGISTRY` (a method found by name, configured by keyword settings). A new method is one
module defining a `Step` subclass with `@register_step`, plus its import in `compax/registrations.py`.

Most steps act on each member alone: subclass `MemberStep` and write `member`, a pure function of
one member's `Compressed` that the population engine vmaps (`compax.member_vmap.chunked_vmap`).
Steps that need the whole population or the data (a search, training) subclass `Step` and write
`__call__`. Every step also runs abstractly (`Context.abstract`: shapes only, no data, no
training), which is how a saved variant's structure is rebuilt for restoring.

Steps are pure: a step's settings are its fields, never the run's config. A setting whose default
comes from the config (e.g. quantize's `observer` from `compress.observer`) is named in the step's
`config_defaults` ({field: dotted config key}); parsing a recipe with the run's config
(`parse_recipe(text, where, config)`, `variant_recipes(names, config)`) fills every such field that
the recipe leaves None with the config's value, once, so `describe()` records the values used.
Parsed without a config, such a field stays None and the step uses the fallback its docstring
states (or raises a UserError). Steps never see the config: the `Context` holds the run's data and
the training procedure that retraining steps share (batch sizes, augmentation, seed), as values.
"""

import ast
import dataclasses
import pathlib
import re
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from compax.compress.compressed import Compressed
from compax.distributed import is_main_process
from compax.errors import UserError
from compax.member_vmap import chunked_vmap

STEPS: dict[str, type["Step"]] = {}


def register_step(cls):
    """Class decorator: makes the `Step` subclass `cls` usable in recipes as `cls.name`."""
    if not cls.name or not re.fullmatch(r"[a-z][a-z0-9_]*", cls.name):
        raise ValueError(f"step name {cls.name!r} must be lowercase letters, digits and _")
    STEPS[cls.name] = cls
    return cls


@dataclasses.dataclass
class Variant:
    """A compressed population while its recipe runs: the module that evaluates it, its
    `Compressed` (leading member axis) and what the steps report (e.g. `sparsity`)."""

    model: Any
    compressed: Compressed
    info: dict = dataclasses.field(default_factory=dict)
    # The folded float32 variables a quantize step rounded (for `qat`); later steps drop them.
    float_variables: Any = None


@dataclasses.dataclass
class Context:
    """What steps may use beyond the population: the run's data, its training procedure and
    caches, as values (`compax.compress_population.recipe_context` fills them from the run's
    config; the defaults serve `compax.one_model.compress`). A step's own settings are its fields
    (`Step.config_defaults`), never read from here.

    `batch_size`, `eval_batch_size`, `augment`, `population_chunk`, `seed`: the run's training
    procedure, which the retraining steps (finetune, qat, distill, gmp, ablate) follow, and its
    seed (member i trains, and a pruning criterion draws its key, from seed + i).

    `abstract`: only shapes are wanted (restoring a saved variant); steps skip data and training.
    `masks`: given pruning masks (one member, `compress`'s single-model API) that replace those a
    pruning step would compute.
    `log_dir`: where training steps write TensorBoard scalars (`compax/train/scalars.py`), each in
    `<log_dir>/<variant>/<step>`: `run_recipe` (given the variant's name) sets `step_log_dir` to
    that directory while the step runs. None: no event files.
    `checkpoint_dir`: where training steps keep their per-epoch checkpoints, likewise in
    `<checkpoint_dir>/<variant>/<step>` (`step_checkpoint_dir`; `compax/train/retrain.py`). None:
    no checkpoints (a killed step starts again).
    """

    dataset: Any = None
    original: Any = None  # the trained population's variables (leading member axis)
    chunk: int = 1
    abstract: bool = False
    masks: Any = None
    calib_images: Any = None
    calib_labels: Any = None  # the calibration images' labels (pruning criteria's gradients)
    seed: int = 0
    batch_size: int = 128
    eval_batch_size: int = 1000
    augment: bool = False
    population_chunk: int = 0
    cache: dict = dataclasses.field(default_factory=dict)
    # (criterion) -> its sparsity search results, see `searched_sparsity`
    searcher: Callable | None = None
    log_dir: pathlib.Path | None = None
    step_log_dir: pathlib.Path | None = None  # the running step's (set by run_recipe)
    checkpoint_dir: pathlib.Path | None = None
    step_checkpoint_dir: pathlib.Path | None = None  # the running step's (set by run_recipe)

    def calibration(self):
        """Normalised calibration images (training images, `compress.calibration_images`)."""
        if self.calib_images is None:
            raise UserError("this recipe quantizes: pass calibration images (training images)")
        return self.calib_images

    def calibration_batch(self, size: int, who: str):
        """`size` calibration images and their labels, for the step named `who`: those at indices
        i * n // size of the n (evenly spread through them, as they are in training-set order)."""
        if self.calib_images is None or self.calib_labels is None:
            raise UserError(f"{who} needs labelled calibration images: run it in a population run"
                            " (compax.compress_population), whose context has them")
        count = len(self.calib_labels)
        if size > count:
            raise UserError(f"{who}: batch={size} exceeds the {count} calibration images: lower"
                            " batch or raise compress.calibration_images")
        index = np.arange(size) * count // size
        return self.calib_images[index], jnp.asarray(self.calib_labels)[index]

    def searched_sparsity(self, criterion) -> float:
        """The pruning level of Schwaiger et al. for `criterion` (a pruning step, e.g.
        `l1_global(exclude=...)`): the largest level whose validation accuracy under that criterion
        stays within `compress.sparsity_tolerance_pp` of the original's. Searched once per run and
        criterion (`cache["sparsity_searches"]`, keyed by the criterion's `search_key()`)."""
        if self.abstract:
            return 0.5
        searches = self.cache.setdefault("sparsity_searches", {})
        key = criterion.search_key()
        if key not in searches:
            if self.searcher is None:
                raise UserError("amount=searched needs a trained population and validation data:"
                                " give the step a fixed amount, e.g. amount=0.5")
            searches[key] = self.searcher(criterion)
        return searches[key]["chosen"]


@dataclasses.dataclass(frozen=True)
class Step:
    """One compression method; its dataclass fields are its settings."""

    name: ClassVar[str] = ""
    # {field: dotted config key, e.g. "compress.observer"}: where a recipe leaves the field None,
    # parsing with the run's config fills in the config's value (`with_config_defaults`).
    config_defaults: ClassVar[dict[str, str]] = {}

    def __call__(self, variant: Variant, ctx: Context) -> Variant:
        raise NotImplementedError

    def check(self, model) -> None:
        """Raises a UserError if the step cannot run on `model` (the run's flax model); called by
        `compax.validate` before any stage runs. Most steps run on any model."""

    def describe(self) -> str:
        """The step as recipe text, with every setting."""
        settings = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}({settings})"


@dataclasses.dataclass(frozen=True)
class MemberStep(Step):
    """A step applied to each member alone: `member` is vmapped over the population."""

    def shared(self, variant: Variant, ctx: Context) -> tuple:
        """Host-side inputs shared by all members (arrays), computed once per population."""
        return ()

    def member(self, model, compressed: Compressed, *shared, ctx: Context) -> Compressed:
        """The compressed member; a pure function of its arrays and `shared` (jit / vmap)."""
        raise NotImplementedError

    def output_model(self, model):
        """The module evaluating the result (the same unless the step changes the architecture)."""
        return model

    def __call__(self, variant: Variant, ctx: Context) -> Variant:
        shared = self.shared(variant, ctx)
        model = variant.model

        def fn(c, *s):
            return self.member(model, c, *s, ctx=ctx)

        if ctx.abstract:
            compressed = jax.eval_shape(jax.vmap(fn, in_axes=(0,) + (None,) * len(shared)),
                                        variant.compressed, *shared)
        else:
            compressed = chunked_vmap(fn, ctx.chunk, num_member_args=1)(variant.compressed, *shared)
        return Variant(self.output_model(model), compressed, dict(variant.info))


# The studies' variants. Names and numbers are those of compax's earlier fixed variants.
RECIPES = {
    "float32": "",
    "pruned": "l1_global(amount=searched)",
    "float16": "cast(dtype=float16)",
    "bfloat16": "cast(dtype=bfloat16)",
    "float16_storage": "half_storage(dtype=float16)",
    "weight_only_int8": "quantize(weight_bits=8,activation_bits=none)",
    "dynamic_int8": "dynamic_quantize(weight_bits=8)",
    "w8a8": "quantize(weight_bits=8,activation_bits=8)",
    "w4a8": "quantize(weight_bits=4,activation_bits=8)",
    "pruned_w8a8": "l1_global(amount=searched)+quantize(weight_bits=8,activation_bits=8)",
    "pruned_layer": "l1_layer(amount=searched)",
    "filters_pruned": "filters(amount=0.25)",
    "ablated": "ablate(epochs=5)",
    # Training-time compression (compax/compress/methods/training.py).
    "gmp_90": "gmp(final=0.9)",
    "pruned_ft": "l1_global(amount=searched)+finetune(epochs=5)",
    "qat_w8a8": "quantize(weight_bits=8,activation_bits=8)+qat(epochs=3)",
    "qat_w4a8": "quantize(weight_bits=4,activation_bits=8)+qat(epochs=3)",
    # Knowledge distillation from each member's original (compax/compress/methods/distill.py),
    # with the epochs of pruned_ft and qat_w4a8.
    "pruned_kd": "l1_global(amount=searched)+distill(epochs=5)",
    "qat_w4a8_kd": "quantize(weight_bits=4,activation_bits=8)+distill(epochs=3)",
    # Hooker et al.'s fixed sparsity levels, global L1 without fine-tuning.
    **{f"sparsity_{round(100 * s)}": f"l1_global(amount={s})" for s in (0.1, 0.3, 0.5, 0.7, 0.9)},
}

_STEP_TEXT = re.compile(r"\s*([a-z][a-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)


def _parse_value(text: str):
    """A setting's value: a Python literal (number, string, True/False), `none`, or a bare word."""
    text = text.strip()
    if text.lower() == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_steps(text: str) -> list[str]:
    """Splits recipe text at the `+` that are outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "+" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise UserError(f"unbalanced parentheses in recipe {text!r}")
    return [p for p in parts + [current] if p.strip()]


def config_value(config, key: str):
    """The value of the dotted `key` (e.g. "compress.observer") in `config` (a ConfigDict or
    nested mapping); `KeyError` if it has none."""
    value = config
    for part in key.split("."):
        if part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def with_config_defaults(step: Step, config) -> Step:
    """`step` with each of its `config_defaults` fields that is None set to the config's value
    (fields whose key the config lacks stay None). `config` None: `step` unchanged."""
    if config is None:
        return step
    filled = {}
    for field, key in step.config_defaults.items():
        if getattr(step, field) is None:
            try:
                filled[field] = config_value(config, key)
            except KeyError:
                continue
    return dataclasses.replace(step, **filled) if filled else step


def parse_step(text: str, where: str, config=None) -> Step:
    """One step of recipe text, e.g. `quantize(weight_bits=4)`; `where` names the config entry.
    `config` (the run's): fills the settings the text leaves None (`Step.config_defaults`)."""
    match = _STEP_TEXT.match(text)
    if not match:
        raise UserError(f"cannot read step {text.strip()!r} of {where}: write name(key=value,...)")
    name, args = match.group(1), match.group(2) or ""
    if name not in STEPS:
        raise UserError(f"unknown compression step {name!r} in {where}: choose one of"
                        f" {', '.join(sorted(STEPS))}")
    cls = STEPS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    settings = {}
    for item in (a for a in re.split(r",(?![^()]*\))", args) if a.strip()):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise UserError(f"step {name} in {where} has no setting {key!r}: its settings are"
                            f" {', '.join(fields) or '(none)'}")
        settings[key] = _parse_value(value)
    try:
        return with_config_defaults(cls(**settings), config)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"bad setting of step {name} in {where}: {e}") from None


def parse_recipe(text: str, where: str, config=None) -> tuple[Step, ...]:
    """The steps of recipe text (empty text: the uncompressed model), their unset settings filled
    from `config` (the run's; see `parse_step`)."""
    return tuple(parse_step(part, where, config) for part in _split_steps(text))


def variant_recipes(names, config=None) -> dict[str, tuple[Step, ...]]:
    """{variant: steps} of the `compress.variants` entries: registered names (`RECIPES`) or
    `name=recipe` text, their unset settings filled from `config` (the run's; see `parse_step`).
    Every name and setting is checked here, before any work."""
    recipes = {}
    for entry in names:
        name, eq, text = str(entry).partition("=")
        name = name.strip()
        where = f"--config.compress.variants entry {str(entry)!r}"
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name) or name == "baseline":
            raise UserError(f"bad variant name {name!r} in {where}: use letters, digits, _ . -"
                            " (not 'baseline')")
        if not eq and name not in RECIPES:
            raise UserError(f"unknown variant {name!r} in --config.compress.variants: choose one of"
                            f" {', '.join(RECIPES)}, or define it as name=step(...)+step(...)")
        if name in recipes:
            raise UserError(f"variant {name!r} appears twice in --config.compress.variants")
        recipes[name] = parse_recipe(text if eq else RECIPES[name], where, config)
    return recipes


def variant_recipe(entry: str, config=None) -> tuple[str, tuple[Step, ...]]:
    """(name, steps) of one `compress.variants` entry: a registered name or `name=recipe` text
    (checked and filled from `config` as `variant_recipes` does)."""
    ((name, steps),) = variant_recipes([entry], config).items()
    return name, steps


def describe(steps: tuple[Step, ...]) -> str:
    """Recipe text with every setting spelled out (what results.json records)."""
    return "+".join(s.describe() for s in steps) or "(uncompressed)"


def step_dirs(steps: tuple[Step, ...]) -> list[str]:
    """The directory name of each step's scalars and checkpoints: its name, with `_2`, `_3`, ...
    appended to the later ones of a name that appears more than once."""
    seen: dict[str, int] = {}
    names = []
    for step in steps:
        seen[step.name] = seen.get(step.name, 0) + 1
        names.append(step.name if seen[step.name] == 1 else f"{step.name}_{seen[step.name]}")
    return names


def run_recipe(steps: tuple[Step, ...], model, variables, ctx: Context,
               name: str | None = None) -> Variant:
    """The variant made by `steps` from the population `variables` (leading member axis);
    `name`, the variant's, places its training steps' scalars under `ctx.log_dir / name` and
    their checkpoints under `ctx.checkpoint_dir / name`."""
    float32 = jax.tree.map(lambda a: a if ctx.abstract else jnp.asarray(a), variables)
    variant = Variant(model, Compressed(float32, None))
    logs = name is not None and ctx.log_dir is not None and not ctx.abstract and is_main_process()
    saves = name is not None and ctx.checkpoint_dir is not None and not ctx.abstract
    for step, directory in zip(steps, step_dirs(steps), strict=True):
        # The same context (its cache included) with this step's directories; steps that do not
        # train write nothing there.
        step_ctx = dataclasses.replace(
            ctx, step_log_dir=pathlib.Path(ctx.log_dir) / name / directory if logs else None,
            step_checkpoint_dir=pathlib.Path(ctx.checkpoint_dir) / name / directory if saves else None)
        variant = step(variant, step_ctx)
    return variant
