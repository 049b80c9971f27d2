"""A source's cache built in Ray Data tasks (dd_dist.data.decoding) is the one built in-process, errors included."""
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dd_dist.config import ClusterConfig
from dd_dist.data import cache, imagefolder
from dd_dist.data.decoding import ray_is_up
from dd_dist.data.splits import load_split
from dd_dist.errors import UserError
from dd_dist.infra.cluster import ray_session
from tests.image_folders import write_image_folder
from tests.test_data import hf_cache, write_parquet  # noqa: F401 (a fixture)

RESIZE = {"resize": [8, 8]}  # the folder's images differ in size


def built(sources: list[tuple[str, str | None]], cache_dir) -> list[dict]:
    """Every split's cached rows and the info of each source, opened in `cache_dir`."""
    out = []
    for name, path in sources:
        root = load_split(name, "train", path, cache_dir=str(cache_dir), transform=RESIZE).source.root
        tables = {f.relative_to(root).as_posix(): pq.read_table(f) for f in sorted(Path(root).rglob("*.parquet"))}
        out.append({"info": json.loads((Path(root) / cache.INFO).read_text()), "tables": tables})
    return out


def test_a_cache_built_in_ray_data_tasks_is_the_one_built_here(tmp_path, hf_cache, monkeypatch):  # noqa: F811
    monkeypatch.setattr(cache, "CHUNK", 8)  # several chunks, so several tasks
    monkeypatch.setattr(imagefolder, "FILES_PER_TASK", 5)
    parquet = tmp_path / "hf"
    parquet.mkdir()
    write_parquet(hf_cache, parquet, {"train": 30, "test": 10}, rgb=True)
    folder = write_image_folder(tmp_path / "images", {"train": 6, "val": 2, "test": 3})
    sources = [(f"hf:{parquet}", None), ("imagefolder", str(folder))]
    assert not ray_is_up()
    here = built(sources, tmp_path / "here")
    with ray_session(ClusterConfig()):
        in_tasks = built(sources, tmp_path / "tasks")
        (folder / "train" / "green" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        with pytest.raises(UserError) as error:
            load_split("imagefolder", "train", str(folder), cache_dir=str(tmp_path / "bad"), transform=RESIZE)
        kept = load_split("imagefolder", "train", str(folder), cache_dir=str(tmp_path / "bad"), transform=RESIZE,
                          skip_bad=True)
    for a, b in zip(here, in_tasks):
        assert a["info"] == b["info"] and a["tables"].keys() == b["tables"].keys()
        assert all(a["tables"][name].equals(b["tables"][name]) for name in a["tables"])
    assert sum(len(t) for t in here[0]["tables"].values()) == 40  # every row of the hf: source, once
    message = str(error.value)
    assert "image train/green/002.png (id 8 of train) cannot be decoded" in message and "\n" not in message
    assert (len(kept), kept.skipped) == (17, 1)


def test_only_a_large_source_not_cached_yet_asks_for_ray(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "images", {"train": 2, "val": 1, "test": 1})
    args = ("imagefolder", str(folder), 0, str(tmp_path / "cache"))
    assert not cache.large_build(*args)  # a few kB: decoded here, faster than starting Ray
    monkeypatch.setattr(cache, "DECODE_IN_RAY_MB", 0)
    assert cache.large_build(*args)
    load_split("imagefolder", "train", str(folder), cache_dir=str(tmp_path / "cache"), transform=RESIZE)
    assert not cache.large_build(*args)  # cached now
    assert not cache.large_build("mnist", None, 0, str(tmp_path / "cache"))  # arrays already: nothing to decode
