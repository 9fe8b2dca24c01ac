"""The command line end to end against the local fake OpenAI server: faults, bad images, outputs, secrets."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from .conftest import TEST_KEY, progress_items, run_cli, write_awkward_images, write_bad_images, write_images
from .fake_server import FakeOpenAIServer, FakeServerSettings

pytestmark = pytest.mark.timeout(120)
FAST_RETRIES = ["--retry-base-delay", "0.02", "--request-timeout", "0.6", "--max-retries", "6"]


def test_cli_survives_faults_and_bad_images(tmp_path):
    data = tmp_path / "data"
    write_images(data, 6)
    (data / "img000.txt").write_text("a tabby kitten on a velvet cushion")
    bad = write_bad_images(data / "bad")
    awkward = write_awkward_images(data / "odd")
    # Every image meets every fault once, in this order, then succeeds: 6 of the 7 attempts --max-retries 6 allows.
    settings = FakeServerSettings(fault_cycle=["429", "500", "timeout", "garbage", "empty", "ok"], timeout_seconds=1.5)
    with FakeOpenAIServer(settings) as server:
        result = run_cli([str(data), "--base-url", server.base_url, "--concurrency", "4", *FAST_RETRIES])
        faults = {request["fault"] for request in server.requests}
    assert result.returncode == 1, result.stderr  # bad images failed, so the exit code says so
    assert faults == {"ok", "429", "500", "timeout", "garbage", "empty"}
    report = json.loads((data / "_lens" / "recaption_report.json").read_text())
    assert report["total"] == 6 + len(bad) + len(awkward) and report["captioned"] == 6 + len(awkward)
    reasons = {failure["key"]: failure["reason"] for failure in report["failures"]}
    assert set(reasons) == {f"bad/{key}" for key in bad}
    for key, words in bad.items():
        assert words in reasons[f"bad/{key}"]
    for key in [f"img{index:03d}" for index in range(6)] + [f"odd/{name}" for name in awkward]:
        caption = (data / f"{key}.txt").read_text()
        assert caption.startswith("Scene ") and caption.endswith("\n")
    assert not list((data / "bad").glob("*.txt"))
    # The original caption went to the server as a hint, and the record keeps it.
    first = next(item for item in progress_items(data) if item["key"] == "img000")
    assert first["original_caption"] == "a tabby kitten on a velvet cushion" and "tabby kitten" in first["caption"]
    assert Image.open(data / "_lens" / "recaption_histogram.png").size == (640, 360)


def test_progress_lines_have_event_done_total(tmp_path, fake_server):
    write_images(tmp_path / "data", 3)
    result = run_cli([str(tmp_path / "data"), "--base-url", fake_server.base_url])
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in (tmp_path / "data" / "_lens" / "progress.jsonl").read_text().splitlines()]
    assert [event["event"] for event in events] == ["start", "item", "item", "item", "end"]
    assert all({"event", "done", "total"} <= set(event) for event in events)
    assert [event["done"] for event in events] == [0, 1, 2, 3, 3]
    assert all(request["authorization"] == f"Bearer {TEST_KEY}" for request in fake_server.requests)
    assert all(request["image_prefix"] == "data:image/jpeg;base64," for request in fake_server.requests)
    # Second run: everything is already captioned, nothing is sent.
    sent = len(fake_server.requests)
    assert run_cli([str(tmp_path / "data"), "--base-url", fake_server.base_url]).returncode == 0
    assert len(fake_server.requests) == sent
    assert run_cli([str(tmp_path / "data"), "--base-url", fake_server.base_url, "--overwrite"]).returncode == 0
    assert len(fake_server.requests) == sent + 3


def test_api_key_never_leaks(tmp_path):
    write_images(tmp_path / "data", 2)
    (tmp_path / "data" / "img000.txt").write_text("FAILME please")
    # img000: HTTP 500 echoing the key; img001: malformed answers echoing it where the quoted excerpt is cut.
    settings = FakeServerSettings(fail_marker="FAILME", echo_authorization=True, fault_cycle=["garbage"])
    with FakeOpenAIServer(settings) as server:
        result = run_cli(
            [
                str(tmp_path / "data"),
                "--base-url",
                server.base_url,
                "--max-retries",
                "1",
                "--retry-base-delay",
                "0",
                "-v",
            ]
        )
    assert result.returncode == 1
    written = [
        path.read_bytes().decode("utf-8", "replace") for path in (tmp_path / "data").rglob("*") if path.is_file()
    ]
    report = (tmp_path / "data" / "_lens" / "recaption_report.json").read_text()
    assert "internal error Bearer [redacted]" in report
    assert "malformed response" in report and "xBearer [redacted]" in report
    for text in [result.stdout, result.stderr, *written]:
        assert TEST_KEY[:10] not in text  # not the key, nor the start of a key cut off by an excerpt


def test_server_down_stops_quickly_with_exit_1(tmp_path):
    write_images(tmp_path / "data", 12)
    result = run_cli(
        [str(tmp_path / "data"), "--base-url", "http://127.0.0.1:9/v1", "--max-retries", "1", "--retry-base-delay", "0"]
    )
    assert result.returncode == 1
    report = json.loads((tmp_path / "data" / "_lens" / "recaption_report.json").read_text())
    assert "unreachable" in report["stopped_reason"] and report["captioned"] == 0
    assert not list((tmp_path / "data").glob("*.txt"))


@pytest.mark.parametrize(("make", "message"), [("missing", "does not exist"), ("empty", "no images found")])
def test_missing_or_empty_folder_exit_2(tmp_path, make, message):
    folder = tmp_path / make
    if make == "empty":
        folder.mkdir()
        (folder / "notes.md").write_text("no images here")
    result = run_cli([str(folder), "--base-url", "http://127.0.0.1:9/v1"])
    assert result.returncode == 2 and message in result.stderr
    assert sorted(path.name for path in tmp_path.rglob("*")) == (["empty", "notes.md"] if make == "empty" else [])


def test_writes_only_inside_output_dir(tmp_path, fake_server):
    data = tmp_path / "data"
    write_images(data, 3)
    before = {path: path.stat().st_mtime_ns for path in data.rglob("*")}
    out = tmp_path / "out"
    args = [str(data), "--output-dir", str(out), "--formats", "sidecar", "jsonl", "webdataset", "parquet"]
    assert run_cli([*args, "--base-url", fake_server.base_url]).returncode == 0
    assert {path: path.stat().st_mtime_ns for path in data.rglob("*")} == before
    metadata = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    # The output folder is a dataset of its own: the images are hard-linked beside their captions.
    assert [row["file_name"] for row in metadata] == ["img000.png", "img001.png", "img002.png"]
    for name in ("img000.png", "img001.png", "img002.png"):
        assert (out / name).stat().st_ino == (data / name).stat().st_ino
    with tarfile.open(out / "captions.tar") as archive:
        assert sorted(archive.getnames()) == sorted(
            f"img00{i}.{ext}" for i in range(3) for ext in ("png", "txt", "json")
        )
    table = pq.read_table(out / "captions.parquet")
    assert table.column("key").to_pylist() == ["img000", "img001", "img002"]
    assert all(text.startswith("Scene ") for text in table.column("text").to_pylist())
    assert sorted(path.name for path in out.glob("*.txt")) == ["img000.txt", "img001.txt", "img002.txt"]


def test_webdataset_and_parquet_inputs_with_shards(tmp_path, fake_server):
    images = write_images(tmp_path / "src", 5)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as archive:
        for path in images:
            archive.add(path, arcname=path.name)
            caption = tmp_path / f"{path.stem}.txt"
            caption.write_text(f"alt text {path.stem}")
            archive.add(caption, arcname=caption.name)
    seen: list[str] = []
    for index in range(2):
        out = tmp_path / "out"
        args = [str(shard), "--output-dir", str(out), "--formats", "parquet", "--shard", f"{index}/2"]
        assert run_cli([*args, "--base-url", fake_server.base_url]).returncode == 0
        table = pq.read_table(out / f"captions-shard{index}of2.parquet")
        seen += table.column("key").to_pylist()
        assert all(original.startswith("alt text img") for original in table.column("original_text").to_pylist())
    assert sorted(seen) == [f"shard-000/img00{i}" for i in range(5)]  # disjoint and complete
    # The Parquet output is itself a valid input (HF image struct column).
    again = tmp_path / "again"
    result = run_cli(
        [
            str(out / "captions-shard0of2.parquet"),
            "--output-dir",
            str(again),
            "--formats",
            "jsonl",
            "--base-url",
            fake_server.base_url,
        ]
    )
    assert result.returncode == 0, result.stderr
    assert len((again / "metadata.jsonl").read_text().splitlines()) == 3


def test_metadata_jsonl_input_supplies_original_caption(tmp_path, fake_server):
    data = tmp_path / "data"
    write_images(data, 2)
    rows = [
        {"file_name": "img000.png", "text": "lighthouse at dusk"},
        {"file_name": "img001.png", "caption": "two goats", "tags": ["farm", "goat"]},
    ]
    (data / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)))
    assert (
        run_cli([str(data), "--output-dir", str(tmp_path / "out"), "--base-url", fake_server.base_url]).returncode == 0
    )
    items = {item["key"]: item for item in progress_items(tmp_path / "out")}
    assert (
        items["img000"]["original_caption"] == "lighthouse at dusk"
        and "lighthouse at dusk" in items["img000"]["caption"]
    )
    assert items["img001"]["original_caption"] == "two goats"


def test_help_lists_every_option():
    result = run_cli(["--help"])
    for option in ("--backend", "--concurrency", "--shard", "--overwrite", "--template", "--formats", "--api-key-env"):
        assert option in result.stdout
    assert Path(__file__).exists()


def test_lens_txt_sidecars_keep_the_alt_text_as_hint_and_train_as_they_are(tmp_path, fake_server):
    from training.data import discover_samples

    data = tmp_path / "data"
    write_images(data, 2)
    (data / "img000.txt").write_text("my cat")
    args = [str(data), "--base-url", fake_server.base_url, "--sidecar-extension", ".lens.txt"]
    assert run_cli(args).returncode == 0
    assert (data / "img000.txt").read_text() == "my cat"  # the alt-text file is untouched
    for _ in range(2):  # a second run (overwrite) still reads the alt-text, not its own output, as the hint
        items = {item["key"]: item for item in progress_items(data)}
        assert items["img000"]["original_caption"] == "my cat" and "my cat" in items["img000"]["caption"]
        assert run_cli([*args, "--overwrite"]).returncode == 0
    # Training on the folder as it is reads the new captions (Recaption recorded .lens.txt in _lens/dataset.json).
    samples = {sample.key: sample.caption for sample in discover_samples(data)}
    assert samples == {key: (data / f"{key}.lens.txt").read_text().strip() for key in ("img000", "img001")}
    assert all(caption.startswith("Scene ") for caption in samples.values())
