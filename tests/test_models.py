"""Architectures and checkpoints: shapes, real dropout modules, weights-only loading."""
import pickle

import pytest
import torch
from torch import nn

from dd_dist.errors import UserError
from dd_dist.models import ARCHS, build_model, init_student_from_teacher, load_model, model_spec, save_model


@pytest.mark.parametrize("arch, shape, classes", [
    ("mlp", (1, 28, 28), 10), ("lenet", (1, 28, 28), 10), ("lenet_all", (1, 28, 28), 10),
    ("cifar_quick", (3, 32, 32), 10), ("nin", (3, 32, 32), 100), ("allconv", (3, 32, 32), 100),
])
def test_every_arch_builds_with_dropout_and_shrinks_with_width(arch, shape, classes):
    model = build_model(arch, shape, classes, p=0.5)
    assert model(torch.rand(2, *shape)).shape == (2, classes)
    assert any(isinstance(m, nn.Dropout) for m in model)
    small = build_model(arch, shape, classes, p=0.5, width=0.5)
    assert sum(p.numel() for p in small.parameters()) < 0.5 * sum(p.numel() for p in model.parameters())


def test_lenet_has_dropout_only_before_the_last_layer():
    modules = list(build_model("lenet", (1, 28, 28), 10))
    assert [i for i, m in enumerate(modules) if isinstance(m, nn.Dropout)] == [len(modules) - 2]
    assert sum(isinstance(m, nn.Dropout) for m in build_model("lenet_all", (1, 28, 28), 10)) == 3


def test_bad_models_are_one_line_errors():
    with pytest.raises(UserError, match="unknown architecture 'vgg'"):
        build_model("vgg", (1, 28, 28), 10)
    with pytest.raises(UserError, match="width"):
        build_model("lenet", (1, 28, 28), 10, width=0)
    with pytest.raises(UserError, match="cannot take inputs"):
        build_model("lenet", (1, 8, 8), 10)
    assert set(ARCHS) == {"mlp", "lenet", "lenet_all", "cifar_quick", "nin", "allconv"}


def test_checkpoint_round_trip(tmp_path):
    spec = model_spec("lenet", (1, 28, 28), 10, 0.5)
    model = build_model(**spec).eval()
    save_model(tmp_path / "m" / "model.pt", model, spec, {"data_fingerprint": "abc"})
    loaded, loaded_spec = load_model(tmp_path / "m" / "model.pt")
    x = torch.rand(3, 1, 28, 28)
    assert loaded_spec == spec and torch.equal(loaded(x), model(x))
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["model.pt"]  # no temp file left
    assert torch.load(tmp_path / "m" / "model.pt", weights_only=True)["data_fingerprint"] == "abc"


class Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_checkpoint_with_pickle_payload_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"spec": {}, "state_dict": {}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="not plain weights"):
        load_model(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError):
        load_model(tmp_path / "plain.pkl")
    assert not (tmp_path / "PWNED").exists()
    for bad in (tmp_path / "missing.pt", tmp_path):
        with pytest.raises(UserError, match="not found or not a file"):
            load_model(bad)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    spec = model_spec("lenet", (1, 28, 28), 10, 0.5)
    save_model(tmp_path / "a.pt", build_model(**model_spec("mlp", (1, 28, 28), 10, 0.5)), spec)
    with pytest.raises(UserError, match="does not match"):
        load_model(tmp_path / "a.pt")


def test_student_from_teacher_copies_or_reinitialises():
    teacher = build_model("lenet", (1, 28, 28), 10)
    same = build_model("lenet", (1, 28, 28), 10)
    assert init_student_from_teacher(same, teacher) == []
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(same.eval()(x), teacher.eval()(x))
    small = build_model("lenet", (1, 28, 28), 10, width=0.6)
    reset = init_student_from_teacher(small, teacher)
    assert {"0.weight", "5.weight", "8.weight"} <= set(reset) and "8.bias" not in reset  # same shape: copied
    assert abs(small.state_dict()["5.weight"].std().item() - 0.01) < 0.001
    assert small.state_dict()["5.bias"].abs().sum() == 0
