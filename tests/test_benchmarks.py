"""The benchmark commands run for minutes to hours outside the suite: each must at least import (a name one of
them imports from another, renamed there, would otherwise surface only when a user starts it), and the
reproduction and the distillation search find a row's teacher where `make reproduce` put it, and the search adds
up its grids."""
import importlib
import json
from pathlib import Path

import pytest

from benchmarks import distill_search, reproduce
from dd_dist.errors import UserError
from dd_dist.labels.format import MANIFEST

MODULES = sorted(p.stem for p in (Path(__file__).parent.parent / "benchmarks").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_module_imports(name):
    importlib.import_module(f"benchmarks.{name}")


def test_a_smaller_students_search_without_its_teacher_names_the_full_row_to_reproduce():
    with pytest.raises(UserError, match=r"runs/reproduce/mnist-lenet_all_prepool-seed999 has no finished teacher "
                                        r"and labels: run `make reproduce SEEDS=999 ROWS=mnist-lenet_all_prepool`"):
        distill_search.search_row("mnist-lenet_all_prepool-w0.6", 999, [0.0005], [1.0], 10, [])


def test_a_row_reuses_the_teacher_and_labels_of_a_finished_run_of_the_same_teacher(tmp_path):
    """A smaller student takes its full row's labelled run, else a sibling's; a full row keeps its own teacher,
    and takes a smaller student's labelled run only where it has none."""
    def finish(name: str, labels: bool = True) -> Path:
        (tmp_path / name / "teacher").mkdir(parents=True)
        (tmp_path / name / "teacher" / "model.pt").touch()
        if labels:
            (tmp_path / name / "labels").mkdir()
            (tmp_path / name / "labels" / MANIFEST).touch()
        return tmp_path / name

    sibling = finish("mnist-lenet-w0.8-seed3")
    assert reproduce.labelled_run(tmp_path, "mnist-lenet-w0.6", 3) == sibling
    assert reproduce.labelled_run(tmp_path, "mnist-lenet", 3) == sibling
    assert reproduce.labelled_run(tmp_path, "mnist-lenet", 4) is None
    full = finish("mnist-lenet-seed3", labels=False)  # its teacher trained, its labels not yet finished
    assert reproduce.labelled_run(tmp_path, "mnist-lenet", 3) is None
    assert reproduce.labelled_run(tmp_path, "mnist-lenet-w0.6", 3) == sibling
    (full / "labels").mkdir()
    (full / "labels" / MANIFEST).touch()
    assert reproduce.labelled_run(tmp_path, "mnist-lenet-w0.6", 3) == full


def test_distillation_searches_of_other_grids_add_up_and_the_pick_spans_them(tmp_path):
    """A second search of the same teacher with another lr keeps the first search's points; a point searched
    again takes its new value; on a tie the config's own point is the pick."""
    configured = {"weight_decay": 0.0005, "lr": 0.001, "lr_steps": [20], "epochs": 30, "width": 1.0}
    unit = {"row": "mnist-lenet", "seed": 0, "teacher_from": "runs/reproduce/mnist-lenet-seed0",
            "teacher_val": {"standard": 0.008, "mc100": 0.008}, "overrides": [], "configured": configured}
    point = lambda wd, lr, err: {"weight_decay": wd, "lr": lr, "val_error": err}  # noqa: E731
    report = tmp_path / "search.json"
    first = {**unit, "grid": [point(0.0005, 0.001, 0.0074), point(0, 0.001, 0.0080)]}
    report.write_text(json.dumps({"rows": [{**first, "pick": first["grid"][0]}]}))
    second = distill_search.with_earlier_points(report, {**unit, "grid": [point(0.0005, 0.003, 0.0074),
                                                                          point(0, 0.001, 0.0071)]})
    assert [(g["weight_decay"], g["lr"], g["val_error"]) for g in second["grid"]] == [
        (0.0005, 0.001, 0.0074), (0.0005, 0.003, 0.0074), (0, 0.001, 0.0071)]
    assert (second["pick"]["weight_decay"], second["pick"]["lr"]) == (0, 0.001)
    tie = distill_search.with_earlier_points(report, {**unit, "grid": [point(0.0005, 0.003, 0.0074)]})
    assert (tie["pick"]["weight_decay"], tie["pick"]["lr"]) == (0.0005, 0.001)
    other_teacher = distill_search.with_earlier_points(report, {**unit, "teacher_val": {"standard": 0.009},
                                                                "grid": [point(0.0005, 0.003, 0.0074)]})
    assert len(other_teacher["grid"]) == 1
