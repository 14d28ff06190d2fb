"""`finetune tune`: hyperparameter search with optuna, through ``Trainer.hyperparameter_search``.

The search runs in this process. The study lives in ``output_dir/tune.db`` (sqlite), so a search that was
killed resumes where it stopped when the same command runs again: finished trials are kept, the trial that
was running is marked failed and its settings are tried first, and only the missing trials run.

One trial = one set of hyperparameters, trained ``tune_seeds`` times (seeds seed, seed+1, ...) inside the
trial's ``train`` call (``SeedMean``); it scores the mean of the seeds' best evaluations. Each evaluation is
also reported to optuna's pruner, which stops a trial whose curve is below the median of earlier trials.
The search writes a results table (``tune_results.md``/``.csv``), a plot (``tune_trials.png``) and the best
settings as a recipe (``best_recipe.yaml``) that ``finetune train best_recipe.yaml`` runs.
"""

from finetune.tune.results import BEST_RECIPE, PLOT_FILE, RESULTS_CSV, RESULTS_MD
from finetune.tune.search import STUDY_FILE, TuneResult, tune

__all__ = ["BEST_RECIPE", "PLOT_FILE", "RESULTS_CSV", "RESULTS_MD", "STUDY_FILE", "TuneResult", "tune"]
