"""Training of single models and populations of seeds (one code path: a population of one)."""

from compax.train.loop import TrainingDiverged, TrainResult, fit, make_optimizer, population_seeds
from compax.train.population import PopulationState, best_variables, init_population

__all__ = [
    "PopulationState", "TrainResult", "TrainingDiverged", "best_variables", "fit",
    "init_population", "make_optimizer", "population_seeds",
]
