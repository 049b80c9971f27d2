"""dd-dist: distributed dropout distillation (Rota Bulò et al., ICML 2016).

The pipeline, top to bottom, and the direction of every import (down only; tests/test_layers.py checks it):

    cli, __main__     one entry point: a subcommand runs stages.<name>.run(cfg)
    pipeline          the Ray session, the parent MLflow run, the stages in order
    stages/           teacher, label, distill, evaluate, compare: each owns its MLflow run and checks
                      that its outputs can be written before it starts
    labels/ train/    the Ray label actors, the shard format and verify; the Ray Train driver and the
                      DeepSpeed worker loop
    infra/            the Ray cluster connection and MLflow tracking (a Tracker object)
    core/             plain PyTorch, no Ray or MLflow: the augmentation, models, MC dropout and its
                      schemes, metrics, the training tasks and the single-process reference loop
    data/             every source as a Parquet cache read row by row: sources, image folders, the
                      data.* transforms, splits
    layout            every path of a run directory, and the splits a run reads
    config, schemes, errors, files   the config tree, the MC scheme value, UserError, atomic writes

Ray, DeepSpeed and MLflow's heavy imports come late, inside the function that needs them, each with a comment;
the CLI imports a subcommand's module only once the config is valid (cli.stage), so a mistake shows at once.
"""
import os

__version__ = "0.1.0"

# Neither Ray nor MLflow may phone home from this package: set before either is imported.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
