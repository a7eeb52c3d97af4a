"""Prints the parameter count of every registered model: `python -m compax.models`."""

import jax

from compax.models import MODELS, count_params, get_model, init_variables


def main() -> None:
    print(f"{'model':<12}{'width':>6}{'classes':>9}{'params':>12}")
    for name in MODELS:
        for width in (1.0, 0.25):
            for classes in (43, 10):
                model = get_model(name, classes, width)
                shapes = jax.eval_shape(lambda m=model: init_variables(m, jax.random.key(0)))
                print(f"{name:<12}{width:>6}{classes:>9}{count_params(shapes['params']):>12,}")


if __name__ == "__main__":
    main()
