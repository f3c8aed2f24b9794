"""The training application: data, models, evaluation and the run orchestration."""
