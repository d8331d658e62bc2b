"""An Optuna search over L1/L2: one MLflow parent run per study, one child run per trial.

The stages, one module each:
  space.py      how a trial becomes (l1, l2); sampler and pruner
  study.py      the study in its Optuna storage; dead workers' trials found and retried
  runs.py       the MLflow side: the study's parent run, trial run names, the best trial, the plots
  objective.py  one trial: suggest -> train (a child run per seed) -> report/prune
  stacked.py    K trials at once as one stacked network, asked and told (ask/tell)
  completion.py a stack's member runs completed (figures, tables) side by side in worker processes
  driver.py     `optimize`: resume or create, run the workers, finish
"""

from .driver import WorkerFailure, optimize, run_worker, threads_per_worker
from .objective import Objective
from .runs import STUDY_TAG, check_parent, finish_study, same_name_elsewhere, trial_run_name
from .space import SearchSpace, effective_penalties, parse_grid, suggest_penalties
from .stacked import stack_size
from .study import FINISHED, SweepSettings, check_resumable, load_study, open_storage

__all__ = ["FINISHED", "STUDY_TAG", "Objective", "SearchSpace", "SweepSettings", "WorkerFailure", "check_parent",
           "check_resumable", "effective_penalties", "finish_study", "load_study", "open_storage", "optimize",
           "parse_grid", "run_worker", "same_name_elsewhere", "stack_size", "suggest_penalties",
           "threads_per_worker", "trial_run_name"]
