"""Hyperparameter search on the host: the search space and objectives that the SageMaker tuning job (aws/,
scripts/tune.py) and the local Optuna search share, and the local search itself."""
