"""`dd-dist <command> [-c CONFIG] [section.key=value ...]`: one entry point for every stage.

Mistakes a user can make print one line and exit 2; bugs keep their traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from dd_dist.config import Config, load_config
from dd_dist.errors import find_user_error
from dd_dist.infra.cluster import default_auth

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def stage(name: str):
    """The module of a subcommand (dd_dist.<name>), imported only once the config is valid: a mistake is
    then reported in a fraction of a second, not after torch, Ray Data and MLflow have loaded (~4 s)."""
    return importlib.import_module(f"dd_dist.{name}")


def cmd_teacher(cfg: Config, args) -> None:
    print(f"teacher saved to {stage('stages.teacher').run(cfg)}")


def cmd_label(cfg: Config, args) -> None:
    print(f"labels written to {stage('stages.label').run(cfg)}")


def cmd_verify(cfg: Config, args) -> None:
    r = stage("labels.verify").verify_labels(args.labels, args.teacher, args.rows, cfg)
    print(f"labels OK: {r['rows']} rows recomputed, mean KL {r['mean_kl']:.3g} <= tolerance {r['tolerance']:.3g}")


def cmd_distill(cfg: Config, args) -> None:
    print(f"student saved to {stage('stages.distill').run(cfg)}")


def cmd_evaluate(cfg: Config, args) -> None:
    stage("stages.evaluate").run(cfg)


def cmd_compare(cfg: Config, args) -> None:
    print(stage("stages.compare").compare(cfg, args.experiment, args.out, args.filter))


def cmd_pipeline(cfg: Config, args) -> None:
    stage("pipeline").run_pipeline(cfg)
    if args.command == "demo":
        print("\nServe that UI over the demo's store:  make mlflow-ui")


COMMANDS = {
    "teacher": ("train the dropout teacher on hard labels", cmd_teacher),
    "label": ("write MC-averaged soft labels with Ray actors", cmd_label),
    "verify": ("recompute a sample of stored labels and check them", cmd_verify),
    "distill": ("train the deterministic student on the soft labels", cmd_distill),
    "evaluate": ("test standard, MC-K and distilled predictions", cmd_evaluate),
    "compare": ("tabulate runs from MLflow side by side", cmd_compare),
    "pipeline": ("run every stage: teacher, label, distill, evaluate", cmd_pipeline),
    "demo": ("the whole pipeline on the bundled demo config", cmd_pipeline),
}


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes in one line too (argparse prints the whole usage first); subcommands inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = OneLineParser(prog="dd-dist", description="Distributed dropout distillation.")
    subs = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("-c", "--config", help="YAML config (see configs/)")
        if name == "verify":
            sub.add_argument("labels", help="label directory written by `dd-dist label`")
            sub.add_argument("--teacher", required=True, help="teacher checkpoint the labels came from")
            sub.add_argument("--rows", type=int, default=256, help="rows to recompute")
        if name == "compare":
            sub.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
            sub.add_argument("--out", help="folder for compare.md and the plots (default: run_dir/compare)")
            sub.add_argument("--filter", help="MLflow search filter over the evaluate runs, e.g. "
                             "'params.`model.p` = \"0.3\"' (default: the newest per dataset and arch)")
        sub.add_argument("overrides", nargs="*", metavar="section.key=value")
    return top


def main(argv: list[str] | None = None) -> int:
    top = parser()
    # Overrides may also follow options (`verify DIR --rows 9 data.path=x`), which argparse leaves over.
    args, extra = top.parse_known_args(argv)
    if any(item.startswith("-") or "=" not in item for item in extra):
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*args.overrides, *extra]
    config_path = args.config or (DEMO_CONFIG if args.command == "demo" else None)
    try:
        cfg = load_config(config_path, args.overrides)
        default_auth(cfg.cluster)
        COMMANDS[args.command][1](cfg, args)
    except Exception as error:
        found = find_user_error(error)  # also one that a Ray actor or training worker raised
        if found is None:
            raise
        # Its one line: Ray Data appends its retry advice to the message of an actor's exception.
        print(f"dd-dist {args.command}: error: {str(found).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dd-dist {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
