"""MAP (Li et al.; SPEC §6): quadratic surrogates of each task's metric over task-wise scaling vectors c, and an
NSGA-III search (pymoo) on them. Work in progress (issue 5): sampling, surrogates and the search."""

from paretomerge.map.sampling import DEFAULT_BUDGETS, check_bounds, initial_samples
from paretomerge.map.search import SurrogateProblem, choose_for_preference, nsga3_front
from paretomerge.map.surrogate import QuadraticSurrogate, design_matrix, num_quadratic_parameters

__all__ = [
    "DEFAULT_BUDGETS",
    "QuadraticSurrogate",
    "SurrogateProblem",
    "check_bounds",
    "choose_for_preference",
    "design_matrix",
    "initial_samples",
    "nsga3_front",
    "num_quadratic_parameters",
]
