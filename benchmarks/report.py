"""What every benchmark report shares: where it ran, and writing its JSON + Markdown atomically."""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from dd_dist.files import atomic_write, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The machine and its load at the start: timings are only comparable under similar load."""
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"Python {platform.python_version()}",
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def write_report(name: str, report: dict, markdown: str) -> Path:
    """benchmarks/results/<name>.json and .md; returns the Markdown file's path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{name}.json", report)
    path = RESULTS / f"{name}.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text(markdown))
    return path


def merge_rows(path: Path, result: dict, markdown: Callable[[dict], str], key: Callable[[dict], tuple]) -> None:
    """Add one finished result to the {"rows": [...]} report at `path`, replacing an earlier one of the same
    key, sorted by key; rewrite its Markdown sibling. Invocations with other rows or seeds add to one report."""
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = sorted([r for r in rows if key(r) != key(result)] + [result], key=key)
    write_json(path, {"rows": rows})
    atomic_write(path.with_suffix(".md"), lambda tmp: Path(tmp).write_text(markdown({"rows": rows})))
