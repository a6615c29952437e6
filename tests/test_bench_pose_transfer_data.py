"""bench/pose_transfer_data.py: its three readers decode the same frames from the shard sets it
writes, and its SSIM rows compare ours with scikit-image's on the same pairs."""
import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import pose_transfer_data as bench  # noqa: E402

pytest.importorskip("skimage")


def test_bench_reads_every_frame_three_ways_and_agrees_with_skimage(capsys, one_thread):
    bench.main(["--frames", "12", "--clips", "2", "--clip-frames", "2", "--size", "32", "--ssim-images", "4",
                "--ssim-threads", "1", "--reps", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    rows = {row["layout"]: row for row in report["reading"]}
    assert rows["synthsl"]["frames"] == 12 and rows["bosphorus"]["frames"] == 4
    assert all(row[key] > 0 for row in rows.values() for key in ("seed_fps", "index_fps", "stream_fps"))
    (ssim_row,) = report["ssim"]
    assert ssim_row["max_abs_difference"] < 1e-6 and ssim_row["threads"] == 1


def test_bench_only_ssim_skips_the_reading(capsys, one_thread):
    bench.main(["--only", "ssim", "--size", "32", "--ssim-images", "3", "--ssim-threads", "1", "2"])
    out = capsys.readouterr().out
    assert "reading" not in out and "| layout |" not in out
    assert [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")] == ["1", "2"]
