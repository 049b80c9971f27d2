"""Bring your own model: MC dropout on any nn.Module whose dropouts are nn.Dropout / nn.Dropout2d modules
(nested, in a residual block), against exact enumeration; the same masks as the flat fast path; and the
factories of `model.arch=package.module:factory`, refused in one line where MC could not be right."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nested_nets
from dd_dist.cli import main
from dd_dist.config import load_config
from dd_dist.data.splits import run_split
from dd_dist.core.loop import train_student, train_teacher
from dd_dist.core.mc import dropout_layers, mc_probs, mc_probs_naive, standard_probs
from dd_dist.core.mc_schemes import mc_label
from dd_dist.core.models import build_model, check_for_mc, load_model, model_spec
from dd_dist.errors import UserError
from dd_dist.labels.actors import label_rows
from dd_dist.schemes import MCScheme

X = torch.tensor([[0.3, -1.2], [1.5, 0.7], [-0.4, 0.9]], dtype=torch.double)
IDS = torch.tensor([11, 12, 13])


def residual(p=0.5) -> nested_nets.ResidualMLP:
    """2 -> 3 -> residual block (3 dropout units) -> dropout (3 units) -> 2: 64 masks to enumerate."""
    torch.manual_seed(0)
    net = nested_nets.ResidualMLP(2, 3, 2, p).double()
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(3)  # a visible gap between weight scaling and the MC mean
    return net.eval()


def residual_logits(net, x, m0, m1):
    """The residual net's forward with given keep-masks, written out independently of mc.py."""
    p = net.drop.p
    h = torch.tanh(net.inp(x))
    h = h + m0 * torch.tanh(net.block.fc(h)) / (1 - p)
    return net.out(m1 * h / (1 - p))


def exact_mean(net, x, logits_of, widths):
    p, total = dropout_layers(net)[0].p, 0
    for bits in itertools.product([0.0, 1.0], repeat=sum(widths)):
        bits = torch.tensor(bits, dtype=torch.double)
        weight = p ** (bits == 0).sum().item() * (1 - p) ** (bits == 1).sum().item()
        total = total + weight * F.softmax(logits_of(net, x, *bits.split(widths)), 1)
    return total


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_mc_of_a_nested_residual_net_converges_to_the_exact_expectation(p):
    net = residual(p)
    with torch.no_grad():
        exact = exact_mean(net, X, residual_logits, [3, 3])
        estimate, stderr = mc_probs(net, X, IDS, 20_000, seed=3, return_stderr=True)
        assert ((estimate - exact).abs().max(1).values <= 4 * stderr).all()
        assert (F.softmax(net(X), 1) - exact).abs().max() > 10 * stderr.max()  # weight scaling misses it
        # the naive loop of k whole passes draws the same masks
        assert torch.allclose(mc_probs(net, X, IDS, 64, seed=5), mc_probs_naive(net, X, IDS, 64, seed=5), atol=1e-12)


def test_dropout2d_masks_whole_channels():
    torch.manual_seed(1)
    net = nested_nets.ChannelNet(1, 2, 4, 2, 0.5).double().eval()
    x = torch.randn(3, 1, 2, 2, dtype=torch.double)

    def logits(net, x, keep):
        h = net.features[:2](x) * keep.view(1, 2, 1, 1) / 0.5
        return net.head(h.flatten(1))

    with torch.no_grad():
        exact = exact_mean(net, x, logits, [2])
        estimate, stderr = mc_probs(net, x, IDS, 20_000, seed=3, return_stderr=True)
    assert ((estimate - exact).abs().max(1).values <= 4 * stderr + 1e-12).all()


def test_a_flat_net_wrapped_in_a_module_gets_the_flat_paths_labels():
    """The fast path (prefix sharing, run_masked) and the hooks (masked_forward) index dropouts alike."""
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 4), nn.Tanh(), nn.Dropout(0.3),
                         nn.Linear(4, 3)).double()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = flat

        def forward(self, x):
            return self.body(x)

    with torch.no_grad():
        assert torch.allclose(mc_probs(Wrapped(), X, IDS, 50, seed=2), mc_probs(flat, X, IDS, 50, seed=2), atol=1e-12)
        adaptive = MCScheme(k=None, k_min=8, k_max=32, antithetic=True)
        wrapped_label, flat_label = mc_label(Wrapped(), X, IDS, 2, adaptive), mc_label(flat, X, IDS, 2, adaptive)
    assert torch.allclose(wrapped_label[0], flat_label[0], atol=1e-12)
    assert torch.equal(wrapped_label[2], flat_label[2])


def test_a_sequential_with_its_own_forward_runs_its_forward():
    """Prefix sharing and the channels-last one-pass walk a plain nn.Sequential module by module; a subclass
    that overrides forward() (here: a residual connection) is run through its forward, by MC and by weight scaling."""
    class Residual(nn.Sequential):
        def forward(self, x):
            return super().forward(x) + x  # 2 inputs, 2 classes

    torch.manual_seed(0)
    net = Residual(nn.Linear(2, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    with torch.no_grad():
        assert torch.allclose(standard_probs(net, X), F.softmax(net.eval()(X), dim=1), atol=1e-12)
        assert torch.allclose(mc_probs(net, X, IDS, 20, seed=2), mc_probs_naive(net, X, IDS, 20, seed=2), atol=1e-12)


def test_what_mc_cannot_do_on_a_nested_net_is_refused():
    net = residual()
    for scheme, words in ((MCScheme(k=8, fanout=(2,)), r"a mask tree \(fanout\)"), (MCScheme(k=8, control_variate=True),
                                                                          "the control variate")):
        with pytest.raises(ValueError, match=f"{words} needs a flat nn.Sequential; this model is a ResidualMLP"):
            mc_label(net, X, IDS, 0, scheme)
    with pytest.raises(ValueError, match="runs twice in one forward pass"):
        mc_probs(nested_nets.shared_dropout(), torch.zeros(2, 64), [0, 1], 4, 0)


# --- model.arch=package.module:factory ---------------------------------------------------------------------

def factory_config(tmp_path, *overrides):
    return load_config(None, ["data.name=synthetic", "model.arch=nested_nets:residual_mlp", "model.kwargs={units: 24}",
                              "teacher.epochs=4", "teacher.lr=0.05", "teacher.lr_steps=[3]", "distill.epochs=2",
                              "distill.lr_steps=[1]", "label.k=16", f"run_dir={tmp_path}", *overrides])


def test_a_factory_net_trains_labels_distils_and_reloads_weights_only(tmp_path):
    cfg = factory_config(tmp_path)
    teacher_file = train_teacher(cfg)
    checkpoint = torch.load(teacher_file, weights_only=True)
    assert checkpoint["spec"]["arch"] == "nested_nets:residual_mlp" and checkpoint["spec"]["kwargs"] == {"units": 24}
    teacher, spec = load_model(teacher_file)
    assert isinstance(teacher, nested_nets.ResidualMLP) and teacher.inp.out_features == 24
    split = run_split(cfg, "train")
    x, y = torch.from_numpy(split.x), torch.from_numpy(split.y)
    assert (standard_probs(teacher, x).argmax(1) == y).float().mean() > 0.9  # it learned the synthetic task
    probs, stderr, *_ = label_rows(teacher, x[:64], torch.arange(64), 16, cfg.seed, 0.2, 0.0)
    assert probs.shape == (64, 4) and (stderr > 0).any()
    # a half-width student of the user's factory (it takes `width`), initialised from the teacher where shapes match
    student = load_model(train_student(load_config(None, [*factory_args(cfg), "distill.width=0.5"])))[0]
    assert student.inp.out_features == 12
    # a student of another family, here one without dropout (a student needs none)
    other = load_config(None, [*factory_args(cfg), "distill.arch=nested_nets:no_dropout", "distill.lr=0.2",
                               "distill.epochs=6", "distill.lr_steps=[5]"])
    student, spec = load_model(train_student(other))
    assert isinstance(student, nn.Sequential) and spec["arch"] == "nested_nets:no_dropout"
    assert (standard_probs(student, x).argmax(1) == y).float().mean() > 0.5


def factory_args(cfg):
    return ["data.name=synthetic", f"model.arch={cfg.model.arch}", "model.kwargs={units: 24}", "distill.epochs=2",
            "distill.lr_steps=[1]", "distill.init=scratch", "label.k=16", f"run_dir={cfg.run_dir}"]


@pytest.mark.parametrize("arch, words", [
    ("no_such_module:net", r"cannot import no_such_module \(ModuleNotFoundError"),
    ("nested_nets:nope", "nested_nets has no function or class nope"),
    ("nested_nets:not_a_module", "returned a str, not an nn.Module"),
    ("nested_nets:no_dropout", "Sequential has no nn.Dropout or nn.Dropout2d module"),
    ("nested_nets:functional_dropout", r"FunctionalDropout \(FunctionalDropout\) is random in its forward pass"),
    ("nested_nets:shared_dropout", "a Dropout module runs twice in one forward pass"),
])
def test_a_factory_mc_cannot_be_right_on_is_refused_in_one_line(arch, words):
    with pytest.raises(UserError, match=words) as error:
        check_for_mc(build_model(arch, (1, 8, 8), 4), model_spec(arch, (1, 8, 8), 4, 0.5))
    assert "\n" not in str(error.value) and arch in str(error.value)


@pytest.mark.parametrize("overrides, words", [
    (["model.arch=resnet"], "or package.module:factory"),
    (["model.kwargs={units: 3}"], "kwargs are for a factory"),
    (["distill.kwargs={units: 3}"], "kwargs are for a factory"),
    (["distill.arch=vgg"], "'distill.arch': Input should be 'mlp'"),
    (["model.arch=nested_nets:residual_mlp", "model.kwargs={p: 0.1}"], None),
])
def test_factory_settings_are_checked(tmp_path, overrides, words):
    if words:
        with pytest.raises(UserError, match=words):
            load_config(None, overrides)
        return
    with pytest.raises(UserError, match="kwargs cannot set p: dd-dist passes them"):
        train_teacher(factory_config(tmp_path, *overrides))


def test_the_cli_refuses_an_unimportable_factory_before_any_work(tmp_path, capsys):
    assert main(["teacher", "data.name=synthetic", "model.arch=no_such_module:net", f"run_dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert "cannot import no_such_module" in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
