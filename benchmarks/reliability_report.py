"""Reliability report: runs the fault, bad-input and security tests with pytest and summarises
faults injected / survived, bad inputs tried / refused and security checks passed.

    .venv/bin/python -m benchmarks.reliability_report [--mine-only]

writes benchmarks/results/reliability.{json,md}. The tests are tests/test_reliability.py and
tests/test_bad_input.py, plus the tests of other modules that inject a fault or check security
(COUNTED below; --mine-only leaves them out). An xfail is a fault not survived or an input not
refused, reported with its reason (the file to fix).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import pytest

from dd_dist.files import atomic_write, write_json

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MINE = ["tests/test_bad_input.py", "tests/test_reliability.py"]
R, B = "tests/test_reliability.py::", "tests/test_bad_input.py::"

# node id (or its prefix for parametrized tests) -> (category, issue item, what is injected or tried)
CATALOGUE = {
    R + "test_label_actor_killed_mid_run":
        ("fault", "1", "a label actor SIGKILLed mid-run: replaced, labels equal an uninterrupted run's"),
    R + "test_no_half_written_shard_is_ever_visible":
        ("fault", "2", "shards read in full again and again while actors write them: no half shard ever visible"),
    "tests/test_labels.py::test_killed_run_resumes_without_recomputing_finished_shards":
        ("fault", "2", "the label driver (and its Ray) SIGKILLed mid-run, re-run: finished shards kept, result identical"),
    "tests/test_trainer.py::test_killed_worker_resumes_from_the_last_checkpoint":
        ("fault", "3", "a DeepSpeed training worker SIGKILLed mid-run: resumed from the last checkpoint, finished"),
    R + "test_damaged_or_mismatched_labels_are_refused_in_one_line[verify-":
        ("fault", "4", "damaged labels, `dd-dist verify`"),
    R + "test_damaged_or_mismatched_labels_are_refused_in_one_line[distill-":
        ("fault", "4", "damaged labels, `dd-dist distill`"),
    R + "test_verify_refuses_a_hand_edited_k": ("fault", "4", "manifest k edited by hand, `dd-dist verify`"),
    R + "test_distill_refuses_a_hand_edited_k": ("fault", "4", "manifest k edited by hand, distill's label check"),
    "tests/test_labels.py::test_verify_refuses_each_kind_of_bad_labels_in_one_line":
        ("fault", "4", "bit flip, missing shard, rows shuffled, other teacher / p / data: verify API"),
    R + "test_training_outlives_a_frozen_tracking_server":
        ("fault", "5", "MLflow server frozen (SIGSTOP) during DeepSpeed training, then resumed: every epoch logged once, model uploaded"),
    "tests/test_tracking.py::test_a_stage_outlives_its_server":
        ("fault", "5", "MLflow server stopped for good during a stage: one warning, stage finishes"),
    R + "test_disk_full_while_labelling":
        ("fault", "6", "disk full while label actors write shards: one-line error, finished shards intact, re-run completes"),
    R + "test_disk_full_while_saving_a_checkpoint":
        ("fault", "6", "disk full while saving a model checkpoint: one-line error, previous checkpoint intact"),
    B + "test_bad_input_is_refused_in_one_line[": ("bad input", "", ""),
    B + "test_student_wider_than_its_teacher_is_refused":
        ("bad input", "", "student-wider-than-its-teacher (teacher width 0.5, distill.width 1)"),
    R + "test_damaged_or_mismatched_labels_are_refused_in_one_line[distill-labels-of-other-data]":
        ("bad input", "", "distill-labels-of-other-data"),
    B + "test_pickle_payload_never_ran":
        ("security", "", "pickled code in a teacher checkpoint (evaluate, label): refused, payload never ran"),
    R + "test_damaged_or_mismatched_labels_are_refused_in_one_line[verify-pickle-payload-teacher]":
        ("security", "", "pickled code in the teacher given to `dd-dist verify`: refused"),
    "tests/test_models.py::test_checkpoints_carrying_pickled_code_are_refused_without_running_it":
        ("security", "", "load_model refuses pickled code (weights_only=True)"),
    R + "test_the_local_ray_serves_no_dashboard":
        ("security", "", "the local Ray serves no dashboard UI; its dashboard head is bound to 127.0.0.1"),
    R + "test_the_local_rays_open_ports_refuse_a_client_without_its_token":
        ("security", "", "the local Ray's ports that Ray binds to every interface refuse a client without the token"),
    R + "test_the_mlflow_ui_binds_loopback_unless_asked":
        ("security", "", "make mlflow-ui and make launch-cluster bind 127.0.0.1 unless HOST is given"),
    R + "test_no_secret_reaches_the_store":
        ("security", "", "fake AWS keys in every process's environment: absent from the MLflow store, artifacts, outputs, Ray logs"),
    "tests/test_tracking.py::test_pipeline_run_is_compared_and_served":
        ("security", "", "a secret in the environment and a password in a URI: absent from params, store, artifacts"),
    "tests/test_cluster.py::test_cloud_cluster_yaml_is_valid_with_a_cpu_head_gpu_workers_and_a_private_dashboard":
        ("security", "", "cloud cluster YAMLs keep the dashboard private"),
    "tests/test_cluster.py::test_kuberay_manifests_have_a_gpu_worker_group_and_expose_nothing":
        ("security", "", "KubeRay manifests expose nothing"),
}


def in_file_order(node_ids: set[str]) -> list[str]:
    """Node ids ordered as their tests are defined: pytest runs them in the order given, and a test
    may rely on running before another (test_tracking stops its server in its second test)."""
    def position(node_id: str) -> tuple[str, int]:
        file, name = node_id.split("::")
        return file, (REPO / file).read_text().find(f"def {name}(")

    return sorted(node_ids, key=position)


COUNTED = in_file_order({key.split("[")[0] for key in CATALOGUE if not key.startswith((R, B))})


class Collector:
    """A pytest plugin keeping each test's outcome, duration and xfail / skip reason."""

    def __init__(self):
        self.tests: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        row = self.tests.setdefault(report.nodeid, {"outcome": "passed", "seconds": 0.0, "reason": ""})
        row["seconds"] += report.duration
        if hasattr(report, "wasxfail"):
            row["outcome"], row["reason"] = ("xfailed" if report.skipped else "xpassed"), report.wasxfail
        elif report.failed:
            row["outcome"] = "failed" if report.when == "call" else "error"
            row["reason"] = str(report.longrepr).strip().splitlines()[-1][:300]
        elif report.skipped:
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else ""
            row["outcome"], row["reason"] = "skipped", str(reason)


def classify(nodeid: str) -> tuple[str, str, str] | None:
    """(category, issue item, description) from the longest CATALOGUE key that starts the node id."""
    matches = [key for key in CATALOGUE if nodeid.startswith(key)]
    if not matches:
        return None
    key = max(matches, key=len)
    category, item, what = CATALOGUE[key]
    # The test's parameter, less what the key already names.
    param = nodeid[len(key):].rstrip("]") if "[" in key else nodeid.partition("[")[2].rstrip("]")
    return category, item, f"{what}: {param}" if param and what else (what or param)


def summarise(tests: dict[str, dict]) -> dict:
    rows = []
    for nodeid, result in tests.items():
        found = classify(nodeid)
        if found:
            category, item, what = found
            rows.append({"test": nodeid, "category": category, "item": item, "what": what, **result})
    count = lambda cat, outcome=None: sum(r["category"] == cat and (outcome is None or r["outcome"] == outcome)
                                          for r in rows)
    return {
        "faults": {"injected": count("fault"), "survived": count("fault", "passed"),
                   "not_survived_known": count("fault", "xfailed"),
                   "failed": count("fault", "failed") + count("fault", "error"),
                   "skipped": count("fault", "skipped")},
        "bad_inputs": {"tried": count("bad input"), "refused": count("bad input", "passed"),
                       "not_refused_known": count("bad input", "xfailed"),
                       "failed": count("bad input", "failed") + count("bad input", "error")},
        "security": {"checks": count("security"), "passed": count("security", "passed"),
                     "known_gaps": count("security", "xfailed"), "failed": count("security", "failed")},
        "rows": rows,
    }


def markdown(report: dict) -> str:
    f, b, s = report["faults"], report["bad_inputs"], report["security"]
    lines = [
        "# Reliability and security", "",
        f"Produced by `{report['command']}` on {report['date']} ({report['machine']}); pytest took "
        f"{report['seconds']:.0f} s (tests/test_bad_input.py + tests/test_reliability.py: "
        f"{report['own_seconds']:.0f} s).", "",
        "| | tried | survived / refused / passed | known gaps (xfail) | failed | skipped |",
        "|---|---:|---:|---:|---:|---:|",
        f"| faults injected | {f['injected']} | {f['survived']} | {f['not_survived_known']} | {f['failed']} | {f['skipped']} |",
        f"| bad inputs | {b['tried']} | {b['refused']} | {b['not_refused_known']} | {b['failed']} | 0 |",
        f"| security checks | {s['checks']} | {s['passed']} | {s['known_gaps']} | {s['failed']} | 0 |", "",
        "Issue items: 1 label actor killed, 2 label driver killed / no half shard, 3 training worker killed, "
        "4 damaged labels, 5 tracking server lost, 6 disk full.", "",
    ]
    for category, title in (("fault", "Faults"), ("bad input", "Bad input"), ("security", "Security")):
        lines += [f"## {title}", "", "| item | what | outcome | s | test |", "|---|---|---|---:|---|"]
        for r in sorted((r for r in report["rows"] if r["category"] == category), key=lambda r: (r["item"], r["test"])):
            outcome = r["outcome"] + (f" ({r['reason']})" if r["reason"] else "")
            lines.append(f"| {r['item']} | {r['what']} | {outcome} | {r['seconds']:.1f} | `{r['test']}` |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mine-only", action="store_true", help="only the two reliability test files")
    args = parser.parse_args()
    os.chdir(REPO)
    collector = Collector()
    targets = MINE if args.mine_only else [*MINE, *COUNTED]
    began = time.perf_counter()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *targets], plugins=[collector])
    seconds = time.perf_counter() - began
    report = {
        "command": "python -m benchmarks.reliability_report" + (" --mine-only" if args.mine_only else ""),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "seconds": seconds, "pytest_exit_code": int(code),
        "own_seconds": sum(r["seconds"] for t, r in collector.tests.items() if t.startswith((R, B))),
        **summarise(collector.tests),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "reliability.json", report)
    atomic_write(RESULTS / "reliability.md", lambda tmp: Path(tmp).write_text(markdown(report) + "\n"))
    print(markdown(report))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
