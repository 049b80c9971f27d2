"""Image folders through dd_dist.data: indexing, the data.* transforms, bad files, and the whole pipeline."""
import json

import numpy as np
import pytest
from PIL import Image

from dd_dist.cli import main
from dd_dist.data.splits import load_split
from dd_dist.errors import UserError
from tests.image_folders import COLOURS, write_image_folder


@pytest.fixture
def folder(tmp_path):
    return write_image_folder(tmp_path / "images", {"train": 6, "val": 2, "test": 3})


def split(folder, which, tmp_path, **kwargs):
    return load_split("imagefolder", which, str(folder), cache_dir=str(tmp_path / "cache"), **kwargs)


def test_a_folder_is_indexed_in_path_order_and_resized_where_read(folder, tmp_path):
    train = split(folder, "train", tmp_path, transform={"resize": [16, 12]})
    assert (len(train), train.num_classes, train.in_shape) == (18, 3, (3, 16, 12))
    assert train.source.info["classes"] == sorted(COLOURS)
    assert list(train.y) == [0] * 6 + [1] * 6 + [2] * 6  # blue, green, red: the sorted class folders
    files = train.source.column("train", "file")
    assert list(files) == sorted(files) and files[7] == "train/green/001.jpg"
    with Image.open(folder / files[7]) as image:  # the row is the file, decoded and resized, / 255
        expected = np.asarray(image.convert("RGB").resize((12, 16), Image.Resampling.BILINEAR)) / np.float32(255)
    assert np.array_equal(train.images([7])[0], expected.transpose(2, 0, 1).astype(np.float32))
    assert np.array_equal(train.images([7, 2]), train.x[[7, 2]]) and train.x.dtype == np.float32
    sizes = {(c, h, w) for c, h, w, _ in train.source.info["splits"]["train"]["shapes"]}
    assert len(sizes) > 1  # the files really differ in size
    with pytest.raises(UserError, match="images differ in size .*set data.resize"):
        split(folder, "train", tmp_path)


def test_shorter_side_resize_center_crop_and_normalise(folder, tmp_path):
    plain = split(folder, "test", tmp_path, transform={"resize": 20, "center_crop": 16})
    normal = split(folder, "test", tmp_path, transform={"resize": 20, "center_crop": 16,
                                                        "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.5]})
    assert plain.in_shape == normal.in_shape == (3, 16, 16) and plain.fingerprint != normal.fingerprint
    mean, std = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.2, 0.25, 0.5], np.float32)
    assert np.allclose(normal.x, (plain.x - mean[:, None, None]) / std[:, None, None], atol=1e-6)
    file = plain.source.column("test", "file")[0]
    with Image.open(folder / file) as image:
        h, w = image.height, image.width
    short = (20, round(w * 20 / h)) if h <= w else (round(h * 20 / w), 20)
    with Image.open(folder / file) as image:
        resized = image.convert("RGB").resize(short[::-1], Image.Resampling.BILINEAR)
    top, left = (short[0] - 16) // 2, (short[1] - 16) // 2
    crop = np.asarray(resized)[top:top + 16, left:left + 16].transpose(2, 0, 1) / np.float32(255)
    assert np.array_equal(plain.x[0], crop.astype(np.float32))


def test_without_val_every_sixth_training_image_by_path_is_held_out(tmp_path):
    folder = write_image_folder(tmp_path / "images", {"train": 30, "test": 2})
    parts = {s: split(folder, s, tmp_path, transform={"resize": [8, 8]}) for s in ("train", "val", "test")}
    files = {s: set(p.source.column(s, "file")) for s, p in parts.items()}
    assert len(files["train"]) + len(files["val"]) == 90 and not files["train"] & files["val"]
    assert 5 <= len(files["val"]) <= 30 and len(set(parts["val"].y)) == 3  # spread over the classes


def test_the_fingerprint_follows_the_files(folder, tmp_path):
    before = split(folder, "train", tmp_path, transform={"resize": [8, 8]})
    assert split(folder, "train", tmp_path, transform={"resize": [8, 8]}).fingerprint == before.fingerprint
    assert split(folder, "train", tmp_path, transform={"resize": [8, 9]}).fingerprint != before.fingerprint
    Image.new("RGB", (30, 30), (9, 9, 9)).save(folder / "train" / "red" / "000.png")
    after = split(folder, "train", tmp_path, transform={"resize": [8, 8]})
    assert after.fingerprint != before.fingerprint and after.source.root != before.source.root


def test_an_undecodable_image_is_named_or_skipped(folder, tmp_path):
    (folder / "train" / "green" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError) as error:
        split(folder, "train", tmp_path, transform={"resize": [8, 8]})
    message = str(error.value)
    assert "image train/green/002.png (id 8 of train) cannot be decoded" in message and "\n" not in message
    assert not list((tmp_path / "cache").glob("*/info.json"))  # nothing half-built left as a cache
    kept = split(folder, "train", tmp_path, transform={"resize": [8, 8]}, skip_bad=True)
    assert len(kept) == 17 and kept.skipped == 1
    assert kept.source.info["splits"]["train"]["skipped"] == ["train/green/002.png"]


@pytest.mark.parametrize("damage, words", [
    (lambda root: [f.unlink() for f in (root / "train" / "red").iterdir()], "class folder .*train/red has no images"),
    (lambda root: (root / "test" / "violet").mkdir(), "class folders that train/ lacks: violet"),
    (lambda root: Image.new("L", (24, 24), 128).save(root / "train" / "blue" / "gray.png"),
     r"mixes channel counts \(train/blue/gray.png has 1, .* has 3\): set data.channels"),
])
def test_bad_folders_are_one_line_errors(folder, tmp_path, damage, words):
    damage(folder)
    with pytest.raises(UserError, match=words) as error:
        split(folder, "train", tmp_path, transform={"resize": [8, 8]})
    assert "\n" not in str(error.value)


def test_empty_folders_and_channel_conversion(folder, tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    with pytest.raises(UserError, match="has no class folders"):
        split(tmp_path / "empty", "train", tmp_path)
    with pytest.raises(UserError, match="has no train/ folder"):
        split(folder / "train", "train", tmp_path)
    Image.new("L", (24, 24), 128).save(folder / "train" / "blue" / "gray.png")
    gray = split(folder, "train", tmp_path, transform={"resize": [8, 8]}, channels=1)
    assert gray.in_shape == (1, 8, 8)
    rgb = split(folder, "train", tmp_path, transform={"resize": [8, 8]}, channels=3)
    row = list(rgb.source.column("train", "file")).index("train/blue/gray.png")
    assert np.allclose(rgb.images([row])[0], 128 / 255)  # the grayscale file read as RGB


def test_a_bad_image_stops_the_cli_before_any_output(folder, tmp_path, capsys):
    (folder / "test" / "red" / "001.jpg").write_bytes(b"garbage")
    run = tmp_path / "run"
    code = main(["teacher", "-c", "configs/imagefolder_example.yaml", f"data.path={folder}", f"run_dir={run}",
                 f"data.cache_dir={tmp_path}/cache", "teacher.epochs=1", "teacher.lr_steps=[]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "test/red/001.jpg" in err[-1] and "cannot be decoded" in err[-1], err
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_example_config_runs_the_pipeline_on_an_image_folder(image_folder_pipeline):
    """The example config's pipeline (conftest.image_folder_pipeline) wrote what it should, and verify
    replays its labels from the files."""
    folder, run, cache_dir = image_folder_pipeline.folder, image_folder_pipeline.run, image_folder_pipeline.cache_dir
    manifest = json.loads((run / "labels" / "manifest.json").read_text())
    assert manifest["data"]["name"] == "imagefolder" and manifest["rows"] == 72 and len(manifest["shards"]) == 3
    assert manifest["data"]["transform"]["resize"] == [64, 64] and manifest["data"]["skipped"] == 0
    spec = manifest["teacher"]["spec"]  # the factory, imported by the DeepSpeed workers and the label actors
    assert (spec["arch"], spec["kwargs"], spec["in_shape"]) == ("examples.nets:small_cnn", {"channels": 4, "hidden": 16},
                                                                [3, 64, 64])
    history = json.loads((run / "teacher" / "history.json").read_text())["epochs"]
    assert history[-1]["loss"] < history[0]["loss"]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["methods"]) == {"standard", "mc-4", "distilled"} and results["test_images"] == 24
    assert main(["verify", str(run / "labels"), "-c", "configs/imagefolder_example.yaml", f"data.path={folder}",
                 f"data.cache_dir={cache_dir}", "--teacher", str(run / "teacher" / "model.pt"), "--rows", "20"]) == 0
