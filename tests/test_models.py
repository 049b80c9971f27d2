"""Architectures and checkpoints: shapes, real dropout modules, width, weights-only loading, student init."""
import hashlib
import pickle

import pytest
import torch
from torch import nn

from dd_dist.core.models import (ARCHS, build_model, file_sha256, init_student_from_teacher, load_model, model_spec,
                                 save_model)
from dd_dist.config import BUILT_IN_ARCHS
from dd_dist.errors import UserError

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def dropout_positions(model):
    return [i for i, m in enumerate(model) if isinstance(m, nn.Dropout)]


@pytest.mark.parametrize("arch, shape, classes", [
    ("mlp", MNIST, 10), ("lenet", MNIST, 10), ("lenet_all", MNIST, 10), ("lenet_all_prepool", MNIST, 10),
    ("cifar_quick", CIFAR, 10), ("cifar_quick", CIFAR, 100), ("nin", CIFAR, 10), ("nin", CIFAR, 100),
    ("allconv", CIFAR, 10), ("allconv", CIFAR, 100),
])
def test_every_arch_builds_with_real_dropout_and_shrinks_with_width(arch, shape, classes):
    model = build_model(arch, shape, classes, p=0.5)
    assert isinstance(model, nn.Sequential) and model.training
    assert model.eval()(torch.rand(3, *shape)).shape == (3, classes)
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert dropouts and all(type(m) is nn.Dropout for m in dropouts)  # plain elementwise dropout, even on conv maps
    small = build_model(arch, shape, classes, p=0.5, width=0.5)
    assert small.eval()(torch.rand(2, *shape)).shape == (2, classes)  # the output layer keeps num_classes
    assert n_params(small) < 0.6 * n_params(model)


def test_dropout_placement_follows_the_paper():
    lenet = build_model("lenet", MNIST, 10)
    assert dropout_positions(lenet) == [len(lenet) - 2]  # only before the last layer
    lenet_all, prepool = build_model("lenet_all", MNIST, 10), build_model("lenet_all_prepool", MNIST, 10)
    assert [type(lenet_all[i - 1]) for i in dropout_positions(lenet_all)] == [nn.MaxPool2d, nn.MaxPool2d, nn.ReLU]
    # Gal & Ghahramani's Caffe lenet-all: conv -> dropout -> max-pool, twice
    assert [type(prepool[i - 1]) for i in dropout_positions(prepool)] == [nn.Conv2d, nn.Conv2d, nn.ReLU]
    assert [type(prepool[i + 1]) for i in dropout_positions(prepool)[:2]] == [nn.MaxPool2d, nn.MaxPool2d]
    assert len(dropout_positions(build_model("mlp", MNIST, 10))) == 2
    assert len(dropout_positions(build_model("nin", CIFAR, 10))) == 2
    allconv = build_model("allconv", CIFAR, 10, p=0.4)
    assert [allconv[i].p for i in dropout_positions(allconv)] == [0.2, 0.4, 0.4]  # input dropout is fixed at 0.2
    quick = build_model("cifar_quick", CIFAR, 10, p=0.3)
    assert len(dropout_positions(quick)) == 4 and quick[-2].p == 0.3


def test_width_scales_hidden_units_and_input_size_follows_the_shape():
    mlp = build_model("mlp", (3, 8, 8), 5, width=0.25)
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [200, 200, 5]
    assert mlp[1].in_features == 3 * 8 * 8
    assert build_model("lenet", MNIST, 10, width=0.001)[0].out_channels == 1  # rounded, at least one unit


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="vgg"), "unknown architecture 'vgg'"),
    (dict(width=0), "width"), (dict(width=-1.0), "width"),
    (dict(p=1.0), "dropout p"), (dict(p=-0.1), "dropout p"),
    (dict(in_shape=(1, 8, 8)), "cannot take inputs"), (dict(arch="allconv", in_shape=(3, 4, 4)), "cannot take inputs"),
    (dict(in_shape=(28, 28)), "input shape"),
])
def test_bad_models_are_one_line_user_errors(kwargs, match):
    args = dict(arch="lenet", in_shape=MNIST, num_classes=10) | kwargs
    with pytest.raises(UserError, match=match) as err:
        build_model(**args)
    assert "\n" not in str(err.value)


def test_registry_names():
    assert set(ARCHS) == {"mlp", "lenet", "lenet_all", "lenet_all_prepool", "cifar_quick", "nin", "allconv"}
    assert set(BUILT_IN_ARCHS) == set(ARCHS)  # the config validates names without building nets


def test_checkpoint_round_trip(tmp_path):
    spec = model_spec("lenet_all", MNIST, 10, 0.5, width=0.5)
    model = build_model(**spec).eval()
    save_model(tmp_path / "new" / "dir" / "model.pt", model, spec, {"data_fingerprint": "abc"})
    loaded, loaded_spec = load_model(tmp_path / "new" / "dir" / "model.pt")
    x = torch.rand(3, *MNIST)
    assert loaded_spec == spec and not loaded.training
    assert torch.equal(loaded(x), model(x))
    assert [p.name for p in (tmp_path / "new" / "dir").iterdir()] == ["model.pt"]  # no temp file left behind
    assert torch.load(tmp_path / "new" / "dir" / "model.pt", weights_only=True)["data_fingerprint"] == "abc"


class Payload:
    """Unpickling this runs code: it writes a marker file."""
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


class Custom:
    pass


def test_checkpoints_carrying_pickled_code_are_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"spec": {}, "state_dict": {}, "evil": Payload()}, tmp_path / "evil.pt")
    torch.save({"spec": {}, "state_dict": {}, "obj": Custom()}, tmp_path / "custom.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps(Payload()))
    for name in ("evil.pt", "custom.pt", "plain.pkl"):
        with pytest.raises(UserError, match="not plain weights") as err:
            load_model(tmp_path / name)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_missing_foreign_or_broken_checkpoints_are_user_errors(tmp_path):
    for bad in (tmp_path / "missing.pt", tmp_path):
        with pytest.raises(UserError, match="not found or not a file"):
            load_model(bad)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a dd-dist model"):
        load_model(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("junk.pt", "empty.pt"):
        with pytest.raises(UserError, match="not plain weights|unreadable"):
            load_model(tmp_path / name)
    torch.save({"spec": {"arch": "lenet"}, "state_dict": {}}, tmp_path / "nospec.pt")
    with pytest.raises(UserError, match="malformed model spec"):
        load_model(tmp_path / "nospec.pt")


def test_checkpoint_whose_weights_do_not_fit_its_architecture_is_refused(tmp_path):
    spec = model_spec("lenet", MNIST, 10, 0.5)
    save_model(tmp_path / "a.pt", build_model("mlp", MNIST, 10), spec)
    with pytest.raises(UserError, match="does not match"):
        load_model(tmp_path / "a.pt")


def test_student_of_the_same_architecture_copies_everything():
    teacher, student = build_model("lenet_all", MNIST, 10), build_model("lenet_all", MNIST, 10)
    assert init_student_from_teacher(student, teacher) == []
    x = torch.rand(2, *MNIST)
    assert torch.equal(student.eval()(x), teacher.eval()(x))


@pytest.mark.parametrize("arch", ["lenet", "lenet_all", "lenet_all_prepool", "mlp", "allconv"])
def test_smaller_student_is_the_teacher_pruned_to_its_strongest_units(arch):
    """A teacher whose units beyond the student's width are dead (zero weights in and out, zero bias) computes
    the same function as the student pruned from it: the prune kept exactly its live units, in order,
    with the right input columns (a Linear after a Flatten reads blocks of positions per kept channel)."""
    torch.manual_seed(0)
    shape = (3, 32, 32) if arch == "allconv" else MNIST
    teacher, student = build_model(arch, shape, 10), build_model(arch, shape, 10, width=0.6)
    weights = [m for m in teacher if isinstance(m, (nn.Conv2d, nn.Linear))]
    narrow = [m for m in student if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for layer, after, small in zip(weights, weights[1:], narrow):
            dead = torch.randperm(layer.out_channels if hasattr(layer, "out_channels") else layer.out_features)
            dead = dead[small.weight.shape[0]:]
            layer.weight[dead] = 0
            layer.bias[dead] = 0
            positions = after.weight.shape[1] // layer.weight.shape[0]
            after.weight[:, (dead[:, None] * positions + torch.arange(positions)).flatten()] = 0
    assert init_student_from_teacher(student, teacher) == []
    x = torch.rand(4, *shape)
    torch.testing.assert_close(student.eval()(x), teacher.eval()(x), rtol=1e-5, atol=1e-5)


def test_a_net_of_another_layout_copies_what_fits_and_reinitialises_the_rest():
    torch.manual_seed(0)
    teacher = build_model("lenet", MNIST, 10)
    student = nn.Sequential(*build_model("lenet", MNIST, 10, width=0.6), nn.Identity())  # not the teacher's layout
    reset = init_student_from_teacher(student, teacher)
    # conv1, conv2 and ip1 have fewer units, ip2 fewer inputs; ip2's bias (10 classes) keeps its shape
    assert {"0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias", "8.weight"} == set(reset)
    state = student.state_dict()
    assert torch.equal(state["8.bias"], teacher.state_dict()["8.bias"])
    assert state["5.weight"].numel() > 100_000 and abs(state["5.weight"].std().item() - 0.01) < 0.0005
    assert abs(state["5.weight"].mean().item()) < 0.0005 and not state["5.bias"].any()


def test_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 3_000_000)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(b"x" * 3_000_000).hexdigest()
