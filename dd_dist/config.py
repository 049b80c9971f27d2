"""One typed config tree for every stage, loaded from YAML plus dotted overrides (`teacher.lr=0.01`).

Validation errors become a one-line UserError naming the key and what is allowed.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dd_dist.errors import UserError
from dd_dist.schemes import MCScheme


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Size = int | list[int] | None  # a number, or [H, W]


class DataConfig(Section):
    # mnist | fashion-mnist | cifar10 | cifar100 | imagefolder | hf:<name-or-path> | synthetic
    name: str = "mnist"
    path: str | None = None  # directory or archive for fashion-mnist, cifar*, imagefolder, local hf copies
    # every source is read from a Parquet copy here, written on first use (a shared mount on a multi-node cluster)
    cache_dir: str = "data/cache"
    train_rows: int = Field(0, ge=0)  # 0 = the whole split
    test_rows: int = Field(0, ge=0)
    # transforms, applied where rows are read: resize (a number: the shorter side, aspect kept; [H, W]: exactly),
    # then center_crop, then the scaling to [0, 1], then (x - mean) / std per channel
    resize: Size = None
    center_crop: Size = None
    mean: list[float] | None = None
    std: list[float] | None = None
    channels: Literal[1, 3] | None = None  # image files converted to grayscale (1) or RGB (3); unset: as they are
    skip_bad: bool = False  # image files that do not decode: false refuses the folder, true leaves them out
    # rows each training worker shuffles in memory (besides a fresh chunk order each epoch); 0: chunk order only
    shuffle_buffer: int = Field(4096, ge=0)
    read_ahead_mb: int = Field(256, ge=1)  # object store the training stream may fill ahead of the workers
    zero_p: float = Field(0.2, ge=0, lt=1)  # distillation augmentation: pixel zeroing
    flip_p: float = Field(0.0, ge=0, le=1)  # horizontal flips (off for digits)

    @field_validator("resize", "center_crop")
    @classmethod
    def _size(cls, size: Size) -> Size:
        sizes = [size] if isinstance(size, int) else size or []
        if len(sizes) not in (0, 1, 2) or any(v < 1 for v in sizes):
            raise ValueError("a size is a number >= 1 or [H, W]")
        return size

    def transform(self) -> dict:
        """The arguments of dd_dist.data.transforms.Transform.of."""
        return {"resize": self.resize, "center_crop": self.center_crop, "mean": self.mean, "std": self.std}


# the names of dd_dist.core.models.ARCHS (tests/test_models.py checks they agree)
BUILT_IN_ARCHS = ("mlp", "lenet", "lenet_all", "lenet_all_prepool", "cifar_quick", "nin", "allconv")
FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # package.module:factory


class ModelConfig(Section):
    # a built-in net, or `package.module:factory`: a function or class of your own that returns an nn.Module
    # whose dropouts are nn.Dropout / nn.Dropout2d modules (it gets in_shape, num_classes, p, width where it
    # names them, and model.kwargs)
    arch: str = "lenet"
    kwargs: dict[str, Any] = {}  # keyword arguments of a factory: plain values (they are stored in checkpoints)
    p: float = Field(0.5, ge=0, lt=1)  # dropout probability

    @field_validator("arch")
    @classmethod
    def _built_in_or_factory(cls, arch: str) -> str:
        return known_arch(arch)

    @model_validator(mode="after")
    def _kwargs_of_a_factory(self):
        check_kwargs(self.arch, self.kwargs)
        return self


def known_arch(arch: str | None) -> str | None:
    if arch is None or arch in BUILT_IN_ARCHS or FACTORY.fullmatch(arch):
        return arch
    raise ValueError(f"Input should be {', '.join(map(repr, BUILT_IN_ARCHS))} or package.module:factory")


def check_kwargs(arch: str | None, kwargs: dict) -> None:
    """A factory's kwargs: plain values, and only for a factory."""
    if kwargs and not (arch and FACTORY.fullmatch(arch)):
        raise ValueError(f"kwargs are for a factory (package.module:factory), not {arch or 'an unset arch'}")
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError("kwargs must be plain values (numbers, strings, lists, mappings): they are stored "
                         "in checkpoints that load with weights_only=True") from None


class TrainConfig(Section):
    """Optimiser and schedule; the defaults are the paper's MNIST LeNet schedule."""

    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_steps: list[int] = [20]  # epochs after which lr is multiplied by lr_gamma
    lr_gamma: float = Field(0.1, gt=0, le=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "deepspeed"] = "sgd"  # sgd: momentum + weight_decay; deepspeed: the JSON's "optimizer" block
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)

    @model_validator(mode="after")
    def _steps_inside_run(self):
        if any(s < 1 or s >= self.epochs for s in self.lr_steps):
            raise ValueError(f"lr_steps {self.lr_steps} must lie in [1, epochs={self.epochs})")
        return self


class DistillConfig(TrainConfig):
    mode: Literal["offline", "online"] = "offline"  # offline: stored MC labels; online: one mask per step
    init: Literal["teacher", "scratch"] = "teacher"  # Ω ← Θ* or a fresh student
    width: float = Field(1.0, gt=0, le=1)  # < 1: a smaller student
    # false: the student learns as the deterministic net it is at test time (the paper's q); true: with dropout on
    dropout: bool = False
    # a student of another family: a built-in name or package.module:factory (unset: model.arch), with its kwargs
    arch: str | None = None
    kwargs: dict[str, Any] = {}
    # a second output that predicts each row's MC mutual information (the labels' mutual_info column), so
    # the student gives probabilities and uncertainty in one pass; its regression loss is weighted by
    # uncertainty_weight against the KL term (dd_dist/core/heads.py)
    uncertainty: bool = False
    uncertainty_weight: float = Field(1.0, ge=0)

    @field_validator("arch")
    @classmethod
    def _built_in_or_factory(cls, arch: str | None) -> str | None:
        return known_arch(arch)

    @model_validator(mode="after")
    def _kwargs_of_a_factory(self):
        check_kwargs(self.arch, self.kwargs)
        if self.uncertainty and self.mode == "online":
            raise ValueError("uncertainty=true needs mode=offline: the head learns the mutual information "
                             "stored in the label shards, and online distillation stores none")
        return self


class LabelConfig(Section):
    # MC masks per image, or "auto": per image as many as its spread needs (stderr_target, k_min, k_max)
    k: int | Literal["auto"] = 100
    stderr_target: float = Field(0.005, gt=0, lt=1)  # k=auto: MC standard error (largest class) to reach
    k_min: int = Field(8, ge=1)  # k=auto: masks of the first (pilot) round, and the step of K
    k_max: int = Field(400, ge=1)  # k=auto: most masks per image
    antithetic: bool = False  # masks in antithetic pairs (a mask and its reflection)
    control_variate: bool = False  # subtract the softmax's first-order expansion around the last dropout's mean
    # a mask tree: each sample of the 2nd, 3rd, ... dropout layer branches into this many (cheap layers
    # near the output get more masks); [] = one mask per layer per sample
    fanout: list[int] = []
    # store each row's MC uncertainty beside its label: entropy H[mean], expected_entropy E_k H[p_k] and
    # mutual_info (their difference); false writes the columns of labels made before they existed
    uncertainty: bool = True
    actors: int = Field(2, ge=1)  # Ray label actors
    batch_size: int = Field(256, ge=1)
    dtype: Literal["float32", "float16", "topk"] = "float16"
    topk: int = Field(3, ge=1)  # classes kept when dtype=topk
    rows_per_shard: int = Field(2048, ge=1)  # a shard is the unit of work and of resume
    cpus_per_actor: float = Field(0.5, gt=0)  # fractional, so Ray Data's own tasks are not starved
    threads_per_actor: int = Field(1, ge=1)  # torch threads inside each actor
    gpus_per_actor: float = Field(1.0, gt=0, le=1)  # with cluster.use_gpu; fractional: actors share a GPU
    # the teacher's forward passes in fp32, or bf16 / fp16 under torch.autocast (softmax and MC mean in fp32);
    # recorded in the manifest, replayed by verify
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    @field_validator("k", mode="before")
    @classmethod
    def _k_or_auto(cls, k):
        if k == "auto":
            return k
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError("Input should be an integer >= 1 or 'auto'")
        if k < 1:
            raise ValueError("Input should be greater than or equal to 1")
        return k

    @model_validator(mode="after")
    def _scheme_runs(self):
        self.scheme()  # its ValueError names what cannot run
        return self

    def scheme(self) -> MCScheme:
        """The MC scheme these settings ask for."""
        return MCScheme(k=None if self.k == "auto" else self.k, stderr_target=self.stderr_target, k_min=self.k_min,
                        k_max=self.k_max, antithetic=self.antithetic, control_variate=self.control_variate,
                        fanout=tuple(self.fanout))


class EvalConfig(Section):
    ks: list[int] = [1, 2, 5, 10, 20, 50, 100]  # MC samples to test
    repeats: int = Field(5, ge=1)  # MC seeds per K
    batch_size: int = Field(500, ge=1)  # test images per timed forward call
    threads: int = Field(0, ge=0)  # torch threads for every method (0 = torch's default)
    ece_bins: int = Field(15, ge=1)  # equal-width confidence bins of ECE and the reliability diagram
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # every method's forward passes (as label.precision)

    @model_validator(mode="after")
    def _positive_ks(self):
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks {self.ks} must be a non-empty list of K >= 1")
        return self


class ClusterConfig(Section):
    address: str | None = None  # Ray address; None starts a local Ray on 127.0.0.1
    num_cpus: int | None = Field(None, ge=1)  # logical CPUs of a local Ray; default: twice the cores, at least 4
    num_workers: int = Field(2, ge=1)  # Ray Train workers
    cpus_per_worker: int = Field(1, ge=1)  # logical CPUs of each training worker, and its torch threads
    # How Ray Train places its workers: PACK fills a node first, SPREAD puts them on different nodes
    # (STRICT_*: or fails to start); see Ray's placement group strategies.
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    use_gpu: bool = False
    deepspeed: str = "configs/deepspeed/zero2.json"
    max_failures: int = Field(2, ge=0)
    # Where Ray Train keeps checkpoints (layout.RunDir.checkpoints): a local path, an NFS mount, s3:// or
    # gs://; unset: run_dir/ray_results. The teacher, label shards and models stay in run_dir: a multi-node
    # cluster on which a node cannot see run_dir (or a local storage_path) is refused
    # (infra.cluster.check_shared_storage).
    storage_path: str | None = None


class TrackingConfig(Section):
    uri: str = "sqlite:///mlruns.db"  # a value other than this default wins over MLFLOW_TRACKING_URI
    experiment: str = "dd-dist"
    http_retries: int = Field(1, ge=0)  # retries of a tracking-server call (MLflow's 7 block for minutes)
    http_timeout_s: int = Field(5, ge=1)  # seconds per tracking-server request
    retry_s: float = Field(30, ge=0)  # a stage that lost its server tries it again after this long; metrics wait


class Config(Section):
    seed: int = 0
    run_dir: str = "runs/default"  # teacher/, labels/, student/ and reports go here
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    teacher: TrainConfig = TrainConfig()
    label: LabelConfig = LabelConfig()
    distill: DistillConfig = DistillConfig()
    eval: EvalConfig = EvalConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. for MLflow params."""
        return _flatten(self.model_dump())

    def resolved(self) -> Config:
        """A copy with run_dir, data.path and a local storage_path made absolute, for Ray workers: they
        may start in another directory (Ray Train's do) or on another node (on the same shared mount)."""
        absolute = lambda path: path if path is None or "://" in path else str(Path(path).expanduser().resolve())  # noqa: E731
        return self.model_copy(update={
            "run_dir": absolute(self.run_dir),
            "data": self.data.model_copy(update={"path": absolute(self.data.path),
                                                 "cache_dir": absolute(self.data.cache_dir)}),
            "cluster": self.cluster.model_copy(update={"storage_path": absolute(self.cluster.storage_path)})})


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise UserError(f"config file {path} must hold a mapping of sections")
    for item in overrides:
        _apply_override(tree, item)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(_one_line(e)) from None


def _apply_override(tree: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"override {item!r} must look like section.key=value")
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override {item!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw) if raw else None


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        section = _section_at(first["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else "?"
        return f"config: unknown key '{key}' (allowed here: {allowed})"
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    where = f"'{key}'" if key else "config"
    return f"config: {where}: {first['msg'].removeprefix('Value error, ')}{shown}"


def _section_at(loc) -> type[BaseModel] | None:
    cls: type[BaseModel] = Config
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        cls = field.annotation
    return cls
