"""Datasets: folders with sidecars or metadata.jsonl, webdataset tars, Parquet; buckets; clear errors for bad data."""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import PIL.Image
import pytest
from train_helpers import CAPTIONS, make_toy_dataset, pattern

from training.data import DatasetError, assign_buckets, bucket_list, choose_bucket, discover_samples, fit_to_bucket


def test_folder_with_sidecars_and_with_metadata_jsonl(tmp_path):
    sidecars = discover_samples(make_toy_dataset(tmp_path / "a", copies=1))
    jsonl = discover_samples(make_toy_dataset(tmp_path / "b", copies=1, sidecars=False))
    assert sorted(s.caption for s in sidecars) == sorted(CAPTIONS) == sorted(s.caption for s in jsonl)
    assert sidecars[0].content_hash == jsonl[0].content_hash  # same pixels, same cache key


def test_metadata_caption_wins_and_uncaptioned_images_are_skipped(tmp_path, caplog):
    folder = make_toy_dataset(tmp_path, copies=1)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "pattern0_0.png", "text": "from jsonl"}) + "\n")
    (folder / "pattern1_0.txt").unlink()
    with caplog.at_level(logging.WARNING):
        samples = discover_samples(folder)
    assert [s.caption for s in samples] == ["from jsonl"]
    assert "1 of 2 images have no caption" in caplog.text


def test_no_captions_no_images_and_bad_jsonl_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        discover_samples(empty)
    folder = make_toy_dataset(tmp_path / "nocaps", copies=1)
    for sidecar in folder.glob("*.txt"):
        sidecar.unlink()
    with pytest.raises(DatasetError, match="None of the 2 images .* has a caption"):
        discover_samples(folder)
    (folder / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(DatasetError, match="line 1 is not a JSON object"):
        discover_samples(folder)
    with pytest.raises(DatasetError, match="does not exist"):
        discover_samples(tmp_path / "missing")


def _png(kind: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pattern(kind)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_webdataset_tar_and_parquet(tmp_path):
    archive = tmp_path / "shard-000.tar"
    with tarfile.open(archive, "w") as tar:
        for key, kind in (("a", 0), ("b", 1)):
            for ext, data in (("png", _png(kind)), ("txt", CAPTIONS[kind].encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = discover_samples(archive)
    assert [s.caption for s in samples] == list(CAPTIONS)
    assert np.asarray(samples[1].open_image()).shape == (64, 64, 3)

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [{"bytes": _png(0)}, {"bytes": _png(1)}], "text": list(CAPTIONS)})
    pq.write_table(table, tmp_path / "data.parquet")
    assert [s.caption for s in discover_samples(tmp_path / "data.parquet")] == list(CAPTIONS)


def test_official_buckets_nearest_ratio_and_no_upscaling_past_the_limit():
    buckets = bucket_list("lens")
    assert len(buckets) == 27
    assert choose_bucket(1024, 1024, buckets, 1.0) == (1024, 1024)
    assert choose_bucket(2000, 1500, buckets, 1.0) == (1152, 864)  # 4:3 at the 1024 area
    assert choose_bucket(800, 600, buckets, 1.25) == (896, 672)  # 1152x864 would upscale 1.44x
    assert choose_bucket(300, 300, buckets, 1.25) is None


def test_images_below_the_smallest_bucket(tmp_path, caplog):
    folder = make_toy_dataset(tmp_path, copies=1, size=32)
    samples = discover_samples(folder)
    with pytest.raises(DatasetError, match=r"below the smallest bucket 64x64"):
        assign_buckets(samples, [(64, 64)], max_upscale=1.5)
    assert len(assign_buckets(samples, [(64, 64)], max_upscale=2.0)) == 2


def test_fit_to_bucket_covers_and_centre_crops():
    image = PIL.Image.fromarray(np.full((40, 80, 3), 255, np.uint8))  # 80 wide, 40 high
    tensor = fit_to_bucket(image, (32, 32))
    assert tuple(tensor.shape) == (3, 32, 32)
    assert tensor.min() >= -1 and tensor.max() <= 1
