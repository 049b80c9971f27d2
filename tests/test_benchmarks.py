"""The benchmark commands run for minutes to hours outside the suite: each must at least import (a name one of
them imports from another, renamed there, would otherwise surface only when a user starts it), and the
distillation search finds a smaller student's teacher where `make reproduce` put it."""
import importlib
from pathlib import Path

import pytest

from benchmarks import distill_search
from dd_dist.errors import UserError

MODULES = sorted(p.stem for p in (Path(__file__).parent.parent / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_module_imports(name):
    importlib.import_module(f"benchmarks.{name}")


def test_a_smaller_students_search_without_its_teacher_names_the_full_row_to_reproduce():
    with pytest.raises(UserError, match=r"runs/reproduce/mnist-lenet_all_prepool-seed999 has no finished teacher "
                                        r"and labels: run `make reproduce SEEDS=999 ROWS=mnist-lenet_all_prepool`"):
        distill_search.search_row("mnist-lenet_all_prepool-w0.6", 999, [0.0005], [1.0], 10, [])
