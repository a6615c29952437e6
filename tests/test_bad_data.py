"""The shared on_error policy of file-backed datasets: raise naming the file, or skip and count."""
import pytest
from PIL import Image

from handforge.errors import DataError
from handforge.plugins.datasets.bad_data import BadData, read_rgb


def test_read_rgb_names_missing_and_corrupt_files(tmp_path):
    Image.new("L", (4, 3), 7).save(tmp_path / "grey.png")
    assert read_rgb(tmp_path / "grey.png").mode == "RGB"
    with pytest.raises(DataError, match="missing.jpg: image file not found"):
        read_rgb(tmp_path / "missing.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="junk.jpg: cannot decode the image"):
        read_rgb(tmp_path / "junk.jpg")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # truncated: found at decode, not at open
    with pytest.raises(DataError, match="cut.jpg: cannot decode"):
        read_rgb(tmp_path / "cut.jpg")


def test_raise_names_the_place_and_skip_counts_by_kind(capsys):
    strict = BadData("toy (train)")
    with pytest.raises(DataError, match=r"a.json\[3\]: box outside the image \(on_error = \"skip\""):
        strict.problem("a.json[3]", "box outside the image", "box outside the image")
    lenient = BadData("toy (train)", "skip")
    lenient.problem("a.json[3]", "box outside the image", "box outside the image")
    lenient.problem("a.json[5]", "box outside the image", "box outside the image")
    lenient.problem("b.json[0]", "landmark is NaN", "NaN landmarks")
    lenient.print_summary(total=10)
    err = capsys.readouterr().err
    assert err.strip() == ("toy (train): skipped 3 of 10 samples (2 box outside the image, 1 NaN landmarks); "
                           "first: a.json[3]: box outside the image")
    assert BadData("quiet").summary() is None
    with pytest.raises(DataError, match="on_error must be"):
        BadData("toy", "ignore")


def test_unreadable_samples_are_replaced_by_the_next_and_counted_once():
    bad = {1, 2}

    def read(i):
        if i in bad:
            raise DataError(f"img{i}.jpg: cannot decode the image")
        return i

    policy = BadData("toy", "skip")
    assert [policy.read_or_skip(i, 4, read) for i in (0, 1, 2, 3, 1)] == [0, 3, 3, 3, 3]
    assert policy.counts["unreadable image"] == 2 and policy.first.startswith("img1.jpg")
    with pytest.raises(DataError, match="img1.jpg"):
        BadData("toy").read_or_skip(1, 4, read)
    everything_bad = BadData("toy", "skip")
    with pytest.raises(DataError, match="no sample could be read"):
        everything_bad.read_or_skip(0, 2, lambda i: read(1))


def test_file_samples_index_like_a_list_and_skip_through_the_policy():
    from handforge.data import check_split
    from handforge.plugins.datasets.bad_data import FileSamples

    class Three(FileSamples):
        name, noun = "three", "images"

        def __init__(self, on_error):
            self.bad = BadData("three", on_error)

        def __len__(self):
            return 3

        def _read(self, i):
            if i == 1:
                raise DataError(f"img{i}.png: cannot decode the image")
            return {"i": i}

    skipping = Three("skip")
    assert [s["i"] for s in skipping.__getitems__([0, -3, 1, -1])] == [0, 0, 2, 2]
    with pytest.raises(IndexError, match="three: index 3 out of range for 3 images"):
        skipping[3]
    with pytest.raises(DataError, match="img1.png"):
        Three("raise")[-2]
    with pytest.raises(DataError, match="three: split must be 'train' or 'val', got 'test'"):
        check_split("three", "test")
