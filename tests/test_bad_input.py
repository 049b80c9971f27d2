"""Bad input, refused: every invalid config or CLI call below runs `python -m dd_dist` in a
subprocess and must exit 2 with exactly one stderr line naming the cause, no traceback, and leave
no output behind (the run_dir it would write is absent or unchanged, the working directory empty).

The calls run concurrently in one module fixture (each is a fresh Python process that mostly
fails before Ray or training starts); one parametrized test per call checks its outcome.
Refusals that need a label directory are in test_reliability.py, which reuses run_cli_calls.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import pytest
import torch

from dd_dist.config import load_config
from dd_dist.core.loop import train_teacher
from dd_dist.core.models import build_model, model_spec, save_model

pytestmark = pytest.mark.slow  # about 50 processes
REPO = Path(__file__).resolve().parent.parent
# Synthetic data (1x8x8, 4 classes) and the MLP: a teacher trains in-process in about a second.
BASE = ["data.name=synthetic", "model.arch=mlp", "teacher.epochs=2", "teacher.lr_steps=[1]", "distill.epochs=2",
        "distill.lr_steps=[1]", "label.k=4", "eval.ks=[1,2]", "eval.repeats=1", "cluster.num_cpus=2"]


@dataclass
class Call:
    """One CLI call and the cause its error line must name. `{run}` is the call's own run_dir (set up
    as `state` says), `{ws}` the shared folder of crafted files."""

    id: str
    argv: str  # the command, then its own flags and overrides (applied after BASE)
    cause: str
    state: str = ""  # "", "teacher", "evil", "foreign", "truncated", "teacher_is_dir", "half_width"
    base: bool = True  # pass BASE and run_dir={run} before the call's own overrides
    entry: bool = False  # run as `python -m dd_dist` (see run_cli_calls)


@dataclass
class Outcome:
    returncode: int
    stderr: str
    before: dict | None  # the run_dir's files (size, mtime) before and after the call
    after: dict | None
    cwd_after: list[str]  # what the call left in its (empty) working directory
    not_cache: list[str]  # what it left in cwd/data that is not a complete entry of the data cache


def snapshot(folder: Path) -> dict | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def run_cli_calls(calls: list[Call], root: Path, prepare, workers: int = 3) -> dict[str, Outcome]:
    """Run every call in its own folder root/<id> ({run} = run/, cwd = cwd/, its own MLflow store),
    `workers` at a time; prepare(run_dir, state) sets up the run_dir first.

    Calls with `entry` run as `python -m dd_dist`. The others, which get as far as a stage, run as
    children forked by one Python process that imported dd_dist, torch, MLflow and Ray Train once:
    each child is its own process (cwd, environment, stderr, exit status) running the same
    dd_dist.cli.main as `python -m dd_dist`, without paying ~4 s of imports per call."""
    template = root / "mlflow-template.db"
    if not template.exists():  # a store in use: no schema migration or "creating experiment" line per call
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{template}").create_experiment("dd-dist")
    warm_up = Call("warm-up", "distill", "no teacher at")  # reaches a stage's MLflow run and Ray Train's imports
    jobs, before = [], {}
    for call in [warm_up, *calls]:
        home = root / call.id
        run, cwd = home / "run", home / "cwd"
        cwd.mkdir(parents=True)
        shutil.copyfile(template, home / "mlruns.db")
        prepare(run, call.state)
        before[call.id] = snapshot(run)
        command, *rest = call.argv.format(run=run, ws=root).split()
        argv = [command, *(BASE + [f"run_dir={run}"] if call.base else []), *rest]  # the call's own keys win
        jobs.append({"id": call.id, "argv": argv, "cwd": str(cwd), "stderr": str(home / "stderr.txt"),
                     "entry": call.entry, "env": {"MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlruns.db'}"}})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # the checkout and this module first, then any packages that this interpreter finds on PYTHONPATH
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), env.get("PYTHONPATH")]))

    def entry_point(job: dict) -> tuple[str, int]:
        with open(job["stderr"], "w") as stderr:
            rc = subprocess.run([sys.executable, "-m", "dd_dist", *job["argv"]], cwd=job["cwd"], stderr=stderr,
                                stdout=subprocess.DEVNULL, env={**env, **job["env"]}, timeout=300).returncode
        return job["id"], rc

    with ThreadPoolExecutor(workers) as pool:
        direct = pool.map(entry_point, [j for j in jobs if j["entry"]])
        forked = subprocess.run([sys.executable, "-c", "from test_bad_input import fork_calls; fork_calls()"],
                                input=json.dumps([j for j in jobs if not j["entry"]]), capture_output=True,
                                text=True, env=env, timeout=600)
        assert forked.returncode == 0, forked.stderr[-3000:]
        codes = {**dict(direct), **json.loads(forked.stdout.splitlines()[-1])}
    return {call.id: Outcome(codes[call.id], (root / call.id / "stderr.txt").read_text(), before[call.id],
                             snapshot(root / call.id / "run"), sorted(os.listdir(root / call.id / "cwd")),
                             not_cache(root / call.id / "cwd"))
            for call in calls}


def not_cache(cwd: Path) -> list[str]:
    cache = cwd / "data" / "cache"
    return sorted([str(p) for p in (cwd / "data").glob("*") if p != cache]
                  + [str(p) for p in cache.glob("*") if not (p / "info.json").is_file() and p.name != "checksums.json"])


def fork_calls(workers: int = 3) -> None:
    """Read jobs (JSON on stdin), the first a warm-up; run each other one as a forked child calling
    dd_dist.cli.main; print their exit codes."""
    import dd_dist.cli  # noqa: F401  the stages' imports, paid once; no thread is running yet, so forking is safe
    import dd_dist.labels.verify  # noqa: F401
    import dd_dist.pipeline  # noqa: F401  (every stage)
    import ray.train.torch  # noqa: F401

    jobs, running, codes = json.load(sys.stdin), {}, {}
    _child(jobs.pop(0), fork=False)  # the warm-up: pays, once, the imports a stage makes lazily (MLflow's store...)
    while jobs or running:
        while jobs and len(running) < workers:
            job = jobs.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(job)
            running[pid] = job["id"]
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    print(json.dumps(codes))


def _child(job: dict, fork: bool = True) -> None:
    """What `python -m dd_dist ARGV` does, in this forked process; never returns. fork=False: the
    warm-up call, in this process, which gets its working directory, environment and stdio back."""
    from dd_dist.cli import main

    saved = os.getcwd(), dict(os.environ), os.dup(1), os.dup(2)
    code = 1
    try:
        os.chdir(job["cwd"])
        os.environ.update(job["env"])
        os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        code = main(job["argv"])
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if fork:
            os._exit(code)
        cwd, environ, out, err = saved
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        os.dup2(out, 1)
        os.dup2(err, 2)


def assert_refused(outcome: Outcome, cause: str) -> None:
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert outcome.returncode == 2, outcome.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert lines[0].startswith("dd-dist") and ": error: " in lines[0] and cause in lines[0], lines[0]
    assert outcome.after == outcome.before, "the call changed its run_dir"
    # At most MLflow's artifact folder (a stage refused inside its run leaves that run, marked FAILED) and
    # complete entries of the data cache (data/cache: a source's Parquet copy, read before the refusal).
    assert set(outcome.cwd_after) <= {"mlruns", "data"}, f"the call left {outcome.cwd_after} in its working directory"
    assert not outcome.not_cache, f"the call left {outcome.not_cache}"


class Payload:
    """Unpickling this runs code: it writes the file MARKER names."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


# Refused while the config and the command line are read: cheap, so each runs as `python -m dd_dist`.
ENTRY_CALLS = [replace(call, entry=True) for call in [
    # The config: keys, types, ranges, files, override syntax.
    Call("unknown-key", "teacher data.nme=x", "unknown key 'data.nme'"),
    Call("unknown-section", "teacher trainer.lr=0.1", "unknown key 'trainer'"),
    Call("wrong-type", "teacher teacher.epochs=abc", "'teacher.epochs': Input should be a valid integer"),
    Call("k-below-1", "label label.k=0", "'label.k': Input should be greater than or equal to 1"),
    Call("p-is-1", "teacher model.p=1.0", "'model.p': Input should be less than 1"),
    Call("p-negative", "teacher model.p=-0.1", "'model.p': Input should be greater than or equal to 0"),
    Call("student-wider-than-1", "distill distill.width=1.5", "'distill.width': Input should be less than or equal to 1"),
    Call("unknown-arch", "teacher model.arch=resnet", "'model.arch'"),
    Call("unknown-label-dtype", "label label.dtype=int8", "'label.dtype'"),
    Call("unknown-precision", "label label.precision=fp8", "'label.precision'"),
    Call("eval-k-below-1", "evaluate eval.ks=[0,5]", "ks [0, 5] must be a non-empty list of K >= 1"),
    Call("lr-step-after-last-epoch", "teacher teacher.lr_steps=[50]", "lr_steps [50] must lie in [1, epochs=2)"),
    Call("no-workers", "teacher cluster.num_workers=0", "'cluster.num_workers'"),
    Call("bad-yaml", "teacher -c {ws}/bad.yaml", "is not valid YAML"),
    Call("yaml-not-a-mapping", "teacher -c {ws}/list.yaml", "must hold a mapping of sections"),
    Call("missing-config-file", "teacher -c {ws}/no-such.yaml", "config file not found"),
    Call("override-without-value", "teacher teacher.epochs", "override 'teacher.epochs' must look like section.key=value"),
    Call("override-into-a-value", "teacher seed.x=1", "'seed': Input should be a valid integer"),
    # The command line itself.
    Call("unknown-command", "frobnicate", "invalid choice: 'frobnicate'", base=False),
    Call("unknown-flag", "teacher --epochs 3", "unrecognized arguments: --epochs", base=False),
    Call("verify-without-teacher", "verify {run}", "the following arguments are required: --teacher", base=False),
    Call("verify-rows-not-a-number", "verify {run} --teacher {ws}/t.pt --rows many", "invalid int value: 'many'",
         base=False),
]]
# Refused by a stage: its data, checkpoints, labels or training settings.
STAGE_CALLS = [
    # Data.
    Call("unknown-dataset", "evaluate data.name=imagenet", "unknown dataset 'imagenet'"),
    Call("cifar-without-path", "evaluate data.name=cifar10", "cifar10 needs a path"),
    Call("missing-data-path", "evaluate data.name=cifar10 data.path={ws}/no-such.tar.gz", "cifar10 archive not found"),
    Call("missing-hf-folder", "evaluate data.name=hf:./no-such-folder", "hf:./no-such-folder: directory not found"),
    Call("rows-too-large", "evaluate data.test_rows=100000", "asked for 100000 rows but synthetic test has only 256"),
    # Teacher checkpoints.
    Call("label-without-teacher", "label", "checkpoint not found or not a file"),
    Call("teacher-is-a-folder", "label", "checkpoint not found or not a file", "teacher_is_dir"),
    Call("foreign-checkpoint", "label", "is not a dd-dist model (no spec/state_dict)", "foreign"),
    Call("truncated-checkpoint", "label", "is unreadable", "truncated"),
    Call("teacher-of-another-arch", "label model.arch=lenet", "is mlp with p=0.5, the config says lenet with p=0.5",
         "teacher"),
    Call("teacher-of-another-p", "label model.p=0.3", "is mlp with p=0.5, the config says mlp with p=0.3", "teacher"),
    Call("distill-teacher-of-another-arch", "distill model.arch=lenet",
         "distill.init=teacher needs the teacher's architecture", "teacher"),
    Call("distill-without-teacher", "distill", "no teacher at"),
    Call("distill-without-labels", "distill", "no manifest.json", "teacher"),
    Call("verify-a-folder-without-labels", "verify {run} --teacher {run}/teacher/model.pt", "no manifest.json",
         "teacher", base=False),
    # Security: pickled code in a checkpoint is refused, never run (see test_pickle_payload_never_ran).
    Call("pickle-payload-teacher-evaluate", "evaluate", "refused: it is not plain weights", "evil"),
    Call("pickle-payload-teacher-label", "label", "refused: it is not plain weights", "evil"),
    # Training settings, refused before Ray Train starts.
    Call("batch-not-divisible-by-workers", "teacher teacher.batch_size=15 cluster.num_workers=2",
         "batch size 15 must be divisible by cluster.num_workers=2"),
    Call("fp16-on-cpu", "teacher cluster.deepspeed={ws}/fp16.json", "enables fp16, which needs GPUs"),
    Call("missing-deepspeed-config", "teacher cluster.deepspeed={ws}/no-such.json", "DeepSpeed config not found"),
    Call("deepspeed-config-not-json", "teacher cluster.deepspeed={ws}/bad.yaml", "is not valid JSON"),
    Call("zero-3", "teacher cluster.deepspeed={ws}/zero3.json", "ZeRO stage 3 is not supported"),
    Call("deepspeed-optimizer-without-block", "teacher teacher.optimizer=deepspeed", "needs an 'optimizer' block"),
    Call("run-dir-not-writable", "teacher run_dir={ws}/a-file/run", "run_dir {ws}/a-file/run/teacher cannot be created"),
    Call("storage-path-not-writable", "teacher cluster.storage_path={ws}/a-file/store",
         "cluster.storage_path {ws}/a-file/store cannot be created"),
]
# GPUs asked for where there is none (this machine's case; where CUDA exists these calls would run).
NO_GPU_CALLS = [] if torch.cuda.is_available() else [
    Call("teacher-on-a-gpu-without-one", "teacher cluster.use_gpu=true", "sees no CUDA device here"),
    Call("label-on-a-gpu-without-one", "label cluster.use_gpu=true label.gpus_per_actor=0.5",
         "sees no CUDA device here", "teacher"),
    Call("evaluate-on-a-gpu-without-one", "evaluate cluster.use_gpu=true", "sees no CUDA device", "teacher"),
]
CALLS = [*ENTRY_CALLS, *STAGE_CALLS, *NO_GPU_CALLS]
# A teacher of width 0.5 with distill.width=1 and init=teacher: the student would be wider than the
# teacher it copies, and init_student_from_teacher silently re-initialises every resized layer.
WIDER_STUDENT = Call("student-wider-than-its-teacher", "distill", "wider than", "half_width")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The crafted files every call may name: a real teacher, broken ones, bad configs."""
    ws = tmp_path_factory.mktemp("bad-input")
    teacher = train_teacher(load_config(None, [*BASE, f"run_dir={ws / 'teacher-run'}"]))
    shutil.copyfile(teacher, ws / "t.pt")
    raw = teacher.read_bytes()
    (ws / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    torch.save({"weights": torch.zeros(3)}, ws / "foreign.pt")
    torch.save({"spec": {}, "state_dict": {}, "evil": Payload(ws / "PWNED")}, ws / "evil.pt")
    half = model_spec("mlp", (1, 8, 8), 4, 0.5, width=0.5)
    save_model(ws / "half.pt", build_model(**half), half)
    (ws / "bad.yaml").write_text("teacher: [epochs: 3\n")
    (ws / "list.yaml").write_text("- teacher\n- label\n")
    (ws / "fp16.json").write_text('{"fp16": {"enabled": true}, "zero_optimization": {"stage": 0}}')
    (ws / "zero3.json").write_text('{"zero_optimization": {"stage": 3}}')
    (ws / "a-file").write_text("a regular file, not a folder")
    return ws


def prepare_run_dir(ws: Path):
    sources = {"teacher": "t.pt", "evil": "evil.pt", "foreign": "foreign.pt", "truncated": "truncated.pt",
               "half_width": "half.pt"}

    def prepare(run: Path, state: str) -> None:
        if not state:
            return
        target = run / "teacher" / "model.pt"
        target.parent.mkdir(parents=True)
        if state == "teacher_is_dir":
            target.mkdir()
        else:
            shutil.copyfile(ws / sources[state], target)

    return prepare


@pytest.fixture(scope="module")
def outcomes(workspace) -> dict[str, Outcome]:
    return run_cli_calls([*CALLS, WIDER_STUDENT], workspace, prepare_run_dir(workspace))


@pytest.mark.parametrize("call", CALLS, ids=[c.id for c in CALLS])
def test_bad_input_is_refused_in_one_line(outcomes, workspace, call):
    assert_refused(outcomes[call.id], call.cause.format(ws=workspace))


def test_student_wider_than_its_teacher_is_refused(outcomes):
    assert_refused(outcomes[WIDER_STUDENT.id], WIDER_STUDENT.cause)


def test_pickle_payload_never_ran(outcomes, workspace):
    for call in ("pickle-payload-teacher-evaluate", "pickle-payload-teacher-label"):
        assert outcomes[call].returncode == 2
    assert not (workspace / "PWNED").exists()
    torch.load(workspace / "evil.pt", weights_only=False)  # the control: an unsafe load does run it
    assert (workspace / "PWNED").read_text() == "pwned"
