"""Config tree: YAML + dotted overrides, and one-line errors that name the key."""
import subprocess
import sys
from pathlib import Path

import pytest

from dd_dist.config import load_config
from dd_dist.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        load_config(path)


def test_overrides_are_typed_and_nested():
    cfg = load_config(REPO / "configs" / "mnist_lenet.yaml", ["teacher.lr=0.01", "label.k=7", "data.path=/x", "eval.ks=[1,3]"])
    assert cfg.teacher.lr == 0.01 and cfg.label.k == 7 and cfg.data.path == "/x" and cfg.eval.ks == [1, 3]
    assert cfg.model.arch == "lenet"  # untouched keys keep the file's value
    assert cfg.flat()["teacher.lr"] == 0.01


@pytest.mark.parametrize("override, words", [
    ("model.p=1.0", ["model.p", "less than 1"]),
    ("model.p=-0.1", ["model.p", "greater than or equal to 0"]),
    ("label.k=0", ["label.k", "greater than or equal to 1"]),
    ("model.pp=0.5", ["unknown key 'model.pp'", "arch, kwargs, p"]),
    ("bogus=1", ["unknown key 'bogus'"]),
    ("teacher.lr=fast", ["teacher.lr", "valid number"]),
    ("model.arch=vgg", ["model.arch", "'lenet'"]),
    ("label.dtype=int8", ["label.dtype", "'topk'"]),
    ("teacher.lr_steps=[40]", ["teacher", "lr_steps"]),
    ("eval.ks=[]", ["eval", "ks"]),
    ("noequals", ["section.key=value"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(UserError) as error:
        load_config(None, [override])
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dd_dist", *args], capture_output=True, text=True, cwd=REPO)


def test_cli_bad_config_is_one_line_exit_2():
    result = run_cli("teacher", "model.p=2")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "model.p" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_lists_every_stage():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ["teacher", "label", "verify", "distill", "evaluate", "compare", "pipeline", "demo"]:
        assert command in result.stdout
