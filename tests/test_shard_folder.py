"""A shard folder without shards is named as such (not "data.train_shards is empty")."""

from __future__ import annotations

import pytest

from alignkit.data.webdataset import expand_urls


def test_a_folder_with_no_tar_says_so(tmp_path):
    (tmp_path / "readme.txt").write_text("no shards here")
    with pytest.raises(FileNotFoundError, match=rf"no \*\.tar files in {tmp_path}"):
        expand_urls(str(tmp_path))
    (tmp_path / "00000.tar").write_bytes(b"")
    assert expand_urls(str(tmp_path)) == [str(tmp_path / "00000.tar")]
