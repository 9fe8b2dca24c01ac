"""The runner in process: unreadable files, duplicate keys, the tags preset, shards without overlap."""

from __future__ import annotations

import pytest

from training.recaption.config import RecaptionConfig
from training.recaption.progress import latest_items
from training.recaption.runner import RecaptionRunner, run

from .conftest import write_images

pytestmark = pytest.mark.timeout(60)


def _config(folder, server, **changes) -> RecaptionConfig:
    return RecaptionConfig(
        inputs=[str(folder)], base_url=server.base_url, progress_bar=False, retry_base_delay=0, **changes
    )


class UnreadableRunner(RecaptionRunner):
    """Makes one file fail to read, as a permission error or a vanished file would."""

    def list_items(self):
        items = super().list_items()

        def refuse() -> bytes:
            raise PermissionError(13, "Permission denied")

        items[1].read_bytes = refuse
        return items


def test_unreadable_file_is_recorded_and_run_continues(tmp_path, fake_server):
    write_images(tmp_path / "data", 3)
    summary = UnreadableRunner(_config(tmp_path / "data", fake_server)).run()
    assert (summary.captioned, summary.failed, summary.exit_code) == (2, 1, 1)
    assert latest_items(tmp_path / "data")["img001"]["reason"] == "cannot read file: Permission denied"


def test_tags_preset_and_custom_target(tmp_path, fake_server):
    write_images(tmp_path / "data", 1)
    run(_config(tmp_path / "data", fake_server, template="tags", target_words=15))
    record = latest_items(tmp_path / "data")["img000"]
    assert record["status"] == "ok" and "too_short" not in record["flags"]


def test_duplicate_keys_across_inputs_are_refused(tmp_path, fake_server):
    write_images(tmp_path / "a", 1)
    write_images(tmp_path / "b", 1)
    config = _config(tmp_path / "a", fake_server, output_dir=str(tmp_path / "out"))
    config.inputs.append(str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"several images share the key\(s\) \['img000'\]"):
        run(config)


def test_shards_split_without_overlap(tmp_path, fake_server):
    write_images(tmp_path / "data", 7)
    keys = [
        {item.key for item in RecaptionRunner(_config(tmp_path / "data", fake_server, shard=f"{index}/3")).list_items()}
        for index in range(3)
    ]
    assert sum(map(len, keys)) == 7 and set.union(*keys) == {f"img{i:03d}" for i in range(7)}
