"""Datasets: the shared contract (folders with sidecars or metadata.jsonl, webdataset tars, Parquet, `_lens/`, caption
sources, several formats in one folder), the pre-load inspection with its bad-image report, and buckets."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
from train_helpers import CAPTIONS, make_toy_dataset, pattern

from training.data import DatasetError, bucket_list, choose_bucket, discover_samples, fit_to_bucket, inspect_dataset
from training.dataset import read_dataset, write_manifest


def _data(path, **changes):
    """A DataConfig-like namespace for `inspect_dataset`."""
    values = {
        "path": str(path),
        "format": "auto",
        "caption_source": "auto",
        "buckets": [[64, 64]],
        "max_upscale": 1.25,
        "max_image_pixels": 10**8,
        "max_bad_fraction": 0.2,
    }
    return SimpleNamespace(**{**values, **changes})


def test_folder_with_sidecars_and_with_metadata_jsonl(tmp_path):
    sidecars = discover_samples(make_toy_dataset(tmp_path / "a", copies=1))
    jsonl = discover_samples(make_toy_dataset(tmp_path / "b", copies=1, sidecars=False))
    assert sorted(s.caption for s in sidecars) == sorted(CAPTIONS) == sorted(s.caption for s in jsonl)
    assert np.array_equal(np.asarray(sidecars[0].load_image()), np.asarray(jsonl[0].load_image()))


def test_metadata_jsonl_is_the_auto_source_and_uncaptioned_images_are_skipped(tmp_path, caplog):
    folder = make_toy_dataset(tmp_path, copies=1)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "pattern0_0.png", "text": "from jsonl"}) + "\n")
    with caplog.at_level(logging.INFO):
        samples = discover_samples(folder)
    assert [s.caption for s in samples] == ["from jsonl"]
    assert (
        "1 of 2 images have no caption in metadata.jsonl" in caplog.text
        and "captions from metadata.jsonl" in caplog.text
    )
    # The sidecars are still there for whoever asks for them.
    assert sorted(s.caption for s in discover_samples(folder, caption_source=".txt")) == sorted(CAPTIONS)


def test_caption_source_other_extensions_columns_and_the_recaption_manifest(tmp_path):
    folder = make_toy_dataset(tmp_path, copies=1)
    for index, image in enumerate(sorted(folder.glob("*.png"))):
        image.with_suffix(".lens.txt").write_text(f"dense caption {index}")
    rows = [
        {"file_name": p.name, "text": "new", "original_text": f"alt {p.stem}"} for p in sorted(folder.glob("*.png"))
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [s.caption for s in discover_samples(folder, caption_source=".lens.txt")] == [
        "dense caption 0",
        "dense caption 1",
    ]
    assert [s.caption for s in discover_samples(folder, caption_source="column:original_text")] == [
        "alt pattern0_0",
        "alt pattern1_0",
    ]
    write_manifest(folder, ".lens.txt")  # what Recaption writes into _lens/
    dataset = read_dataset(folder)
    assert dataset.caption_source == ".lens.txt" and "recorded by Recaption" in dataset.notes[0]
    assert read_dataset(folder, use_manifest=False).caption_source == "metadata.jsonl"


def test_tool_files_are_never_dataset_content(tmp_path):
    folder = make_toy_dataset(tmp_path, copies=1)
    (folder / "_lens").mkdir()
    PIL.Image.new("RGB", (64, 64)).save(folder / "_lens" / "recaption_histogram.png")
    PIL.Image.new("RGB", (64, 64)).save(folder / "recaption_histogram.png")  # where older versions wrote it
    PIL.Image.new("RGB", (64, 64)).save(folder / ".hidden.png")
    assert sorted(item.key for item in read_dataset(folder).items) == ["pattern0_0", "pattern1_0"]


def _png(kind: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pattern(kind)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path) -> None:
    with tarfile.open(path, "w") as tar:
        for key, kind in (("a", 0), ("b", 1)):
            for ext, data in (("png", _png(kind)), ("txt", CAPTIONS[kind].encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_and_parquet(tmp_path):
    archive = tmp_path / "shard-000.tar"
    _write_tar(archive)
    samples = discover_samples(archive)
    assert [s.caption for s in samples] == list(CAPTIONS)
    assert np.asarray(samples[1].load_image()).shape == (64, 64, 3)

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [{"bytes": _png(0)}, {"bytes": _png(1)}], "text": list(CAPTIONS), "alt": ["x", "y"]})
    pq.write_table(table, tmp_path / "data.parquet")
    assert [s.caption for s in discover_samples(tmp_path / "data.parquet")] == list(CAPTIONS)
    assert [s.caption for s in discover_samples(tmp_path / "data.parquet", caption_source="column:alt")] == ["x", "y"]


def test_one_dataset_in_several_formats_is_read_once_and_the_choice_is_said(tmp_path, caplog):
    folder = make_toy_dataset(tmp_path / "several", copies=1)
    _write_tar(folder / "captions.tar")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [{"bytes": _png(0)}], "text": ["p"]}), folder / "captions.parquet")
    with caplog.at_level(logging.INFO):
        samples = discover_samples(folder)
    assert len(samples) == 2 and all(s.key.startswith("pattern") for s in samples)  # not 2 + 2 + 1
    assert "several formats (folder, webdataset, parquet); reading folder" in caplog.text
    assert [s.key for s in discover_samples(folder, format="webdataset")] == ["captions/a", "captions/b"]
    with pytest.raises(DatasetError, match="holds no parquet dataset|holds no"):
        discover_samples(make_toy_dataset(tmp_path / "plain", copies=1), format="parquet")


def test_no_captions_no_images_and_bad_jsonl_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        discover_samples(empty)
    folder = make_toy_dataset(tmp_path / "nocaps", copies=1)
    for sidecar in folder.glob("*.txt"):
        sidecar.unlink()
    with pytest.raises(DatasetError, match="None of the 2 images .* has a caption in .txt"):
        discover_samples(folder)
    (folder / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(DatasetError, match="line 1 is not a JSON object"):
        discover_samples(folder)
    with pytest.raises(DatasetError, match="does not exist"):
        discover_samples(tmp_path / "missing")


def test_inspection_lists_bad_images_and_stops_above_the_bad_fraction(tmp_path):
    folder = make_toy_dataset(tmp_path, copies=3)  # 6 good images
    good = (folder / "pattern0_0.png").read_bytes()
    (folder / "broken.png").write_bytes(good[:60])
    (folder / "broken.txt").write_text("a broken file")
    plan = inspect_dataset(_data(folder))
    assert plan.report.usable == 6 and [b["source"] for b in plan.report.bad_images] == [str(folder / "broken.png")]
    assert "truncated" in plan.report.bad_images[0]["reason"]
    assert {p.bucket for p in plan.samples} == {(64, 64)} and len({p.content_hash for p in plan.samples}) == 2
    with pytest.raises(
        DatasetError, match=r"1 of 7 captioned images are unreadable \(14%, above data.max_bad_fraction=0.1\)"
    ):
        inspect_dataset(_data(folder, max_bad_fraction=0.1))


def test_official_buckets_nearest_ratio_and_no_upscaling_past_the_limit():
    buckets = bucket_list("lens")
    assert len(buckets) == 27
    assert choose_bucket(1024, 1024, buckets, 1.0) == (1024, 1024)
    assert choose_bucket(2000, 1500, buckets, 1.0) == (1152, 864)  # 4:3 at the 1024 area
    assert choose_bucket(800, 600, buckets, 1.25) == (896, 672)  # 1152x864 would upscale 1.44x
    assert choose_bucket(300, 300, buckets, 1.25) is None


def test_images_below_the_smallest_bucket(tmp_path):
    folder = make_toy_dataset(tmp_path, copies=1, size=32)
    with pytest.raises(DatasetError, match=r"below the smallest bucket 64x64"):
        inspect_dataset(_data(folder, max_upscale=1.5))
    assert inspect_dataset(_data(folder, max_upscale=2.0)).report.usable == 2


def test_fit_to_bucket_covers_and_centre_crops():
    image = PIL.Image.fromarray(np.full((40, 80, 3), 255, np.uint8))  # 80 wide, 40 high
    tensor = fit_to_bucket(image, (32, 32))
    assert tuple(tensor.shape) == (3, 32, 32)
    assert tensor.min() >= -1 and tensor.max() <= 1
