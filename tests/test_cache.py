"""`handforge prepare cache` and the `cached` dataset: round trip, atomicity, refusals, no decoding."""
import json
import pathlib
import pickle

import pytest
import torch

from handforge.data import build_loader, check_sample
from handforge.errors import DataError, HandforgeError, RecipeError
from handforge.plugins.datasets.cache import Cached, CachedConfig, prepare_cache, provides, table_hash
from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig
from conftest import cli_exit

pytestmark = pytest.mark.usefixtures("one_thread")
COUNT = 36


def write_table(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


@pytest.fixture
def table(tmp_path):
    return write_table(tmp_path / "hands.toml", f'name = "procedural_hands"\nsize = 32\nlength = {COUNT}\nseed = 5\n')


@pytest.fixture
def cache(tmp_path, table):
    prepare_cache(table, tmp_path / "cache", split="both", batch=10)
    return tmp_path / "cache"


def source(split="train", **options):
    return ProceduralHands(ProceduralHandsConfig(size=32, length=COUNT, seed=5, **options), split)


def expected_image(image: torch.Tensor) -> torch.Tensor:
    """The stored pixel value, written out independently: round((v + 1) * 127.5) back to [-1, 1]."""
    levels = torch.round((image.double() + 1) * 127.5).clamp(0, 255)
    return (levels / 127.5 - 1).float()


@pytest.mark.parametrize("split", ["train", "val"])
def test_round_trip_every_field(cache, split):
    original = source(split).__getitems__(list(range(COUNT)))
    cached = Cached(CachedConfig(path=str(cache)), split)
    assert len(cached) == COUNT and cached.image_size == 32
    order = [7, 0, 35, -1, 12, 12]  # shuffled, a negative index, a repeat
    batch = cached.__getitems__(order)
    check_sample(batch, batched=True)
    rows = torch.tensor(order) % COUNT
    assert set(batch) == set(original)
    for field, value in original.items():
        want = value[rows]
        assert batch[field].dtype == want.dtype, field
        if field == "image":
            assert (batch[field] - want).abs().max() <= 1 / 255 + 1e-6  # half a uint8 step
            torch.testing.assert_close(batch[field], expected_image(want), atol=1e-6, rtol=0)
        else:
            assert torch.equal(batch[field], want), field
    single = cached[3]
    for field in original:
        assert torch.equal(single[field], cached.__getitems__([3])[field][0]), field


def test_class_names_and_options_recorded(tmp_path):
    table = write_table(tmp_path / "spell.toml", 'name = "procedural_hands"\nsize = 16\nlength = 8\n'
                                                 'classes = "fingerspelling"\n')
    info = prepare_cache(table, tmp_path / "c")
    names = ProceduralHands(ProceduralHandsConfig(size=16, length=8, classes="fingerspelling")).class_names
    cached = Cached(CachedConfig(path=str(tmp_path / "c")))
    assert cached.class_names == names and info["class_names"] == names
    stored = json.loads((tmp_path / "c/cache.json").read_text())
    assert stored["source"] == {"name": "procedural_hands", "size": 16, "length": 8, "classes": "fingerspelling"}
    assert stored["source_hash"] == table_hash(dict(reversed(list(stored["source"].items()))))  # key order free
    assert stored["options"]["classes"] == "fingerspelling" and stored["splits"]["train"]["count"] == 8
    assert stored["splits"]["train"]["images"]["image"]["shape"] == [8, 3, 16, 16]
    assert (tmp_path / "c/train/images.u8").stat().st_size == 8 * 3 * 16 * 16
    with pytest.raises(DataError, match=r"no 'val' split cached.*--split val"):
        Cached(CachedConfig(path=str(tmp_path / "c")), "val")
    assert set(provides(CachedConfig(path=str(tmp_path / "c")))) == {
        "image", "label", "keypoints", "joints3d", "hand_pose", "handedness", "identity"}


def test_recipe_data_table_and_limit(tmp_path):
    recipe = write_table(tmp_path / "r.toml", 'name = "x"\n[task]\nname = "gan"\n'
                                              '[data]\nname = "procedural_hands"\nsize = 16\nlength = 50\n')
    info = prepare_cache(recipe, tmp_path / "c", limit=9, overrides=["seed=2"])
    assert info["source"]["seed"] == 2 and info["splits"]["train"]["count"] == 9
    neither = write_table(tmp_path / "n.toml", "size = 3\n")
    with pytest.raises(RecipeError, match=r"n\.toml: neither a \[data\] table"):
        prepare_cache(neither, tmp_path / "d")
    bad = write_table(tmp_path / "b.toml", 'name = "procedural_hands"\nsize = "big"\n')
    with pytest.raises(RecipeError, match=r"b\.toml: data\.size"):
        prepare_cache(bad, tmp_path / "d")


def test_interrupted_prepare_leaves_nothing_loadable(tmp_path, table, monkeypatch):
    calls = []
    real = ProceduralHands.__getitems__

    def interrupted(self, indices):
        calls.append(indices)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second batch
        return real(self, indices)

    monkeypatch.setattr(ProceduralHands, "__getitems__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_cache(table, tmp_path / "cache", batch=10)
    assert not (tmp_path / "cache").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cache")]  # the partial folder is gone
    with pytest.raises(DataError, match="cache folder not found"):
        Cached(CachedConfig(path=str(tmp_path / "cache")))


def test_folder_without_cache_json_is_refused(cache):
    # What a killed prepare (no cleanup possible) would leave if it wrote in place: pixels but no cache.json.
    (cache / "cache.json").unlink()
    with pytest.raises(DataError, match=r"cache\.json: not found.*no complete cache"):
        Cached(CachedConfig(path=str(cache)))


def test_other_layout_and_truncated_pixels_are_refused(cache):
    info_file = cache / "cache.json"
    info = json.loads(info_file.read_text())
    info_file.write_text(json.dumps({**info, "layout": 2}))
    with pytest.raises(DataError, match=rf"{info_file}: cache layout 2 .*reads layout 1"):
        Cached(CachedConfig(path=str(cache)))
    info_file.write_text(json.dumps({**info, "format": "hdf5"}))
    with pytest.raises(DataError, match=rf"{info_file}: not a handforge cache"):
        Cached(CachedConfig(path=str(cache)))
    info_file.write_text(json.dumps(info))
    pixels = cache / "train/images.u8"
    pixels.write_bytes(pixels.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"{pixels}: {COUNT * 3 * 32 * 32 - 100} bytes"):
        Cached(CachedConfig(path=str(cache)))


def test_no_decoding_in_the_cached_path(cache, monkeypatch):
    import PIL.Image

    def no_decode(*args, **kwargs):
        raise AssertionError("the cached dataset must not decode images")

    monkeypatch.setattr(PIL.Image, "open", no_decode)
    monkeypatch.setattr(PIL.Image, "fromarray", no_decode)
    dataset = Cached(CachedConfig(path=str(cache)))
    batches = list(build_loader(dataset, batch_size=12, seed=0))
    assert len(batches) == 3 and batches[0]["image"].shape == (12, 3, 32, 32)
    seen = torch.cat([b["identity"] for b in batches])
    assert sorted(seen.tolist()) == sorted(dataset.fields["identity"].tolist())  # every sample once


def test_pickles_without_the_pixels(cache):
    dataset = Cached(CachedConfig(path=str(cache)))
    first = dataset[0]  # opens the memory maps
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    assert len(pickle.dumps(dataset)) < COUNT * 3 * 32 * 32  # paths, not the pixel file
    assert all(torch.equal(first[k], copy[0][k]) for k in first)


cli = cli_exit  # handforge ARGS in this process: (exit code, stdout, stderr)


def test_cli_prepare_cache_and_inspect(tmp_path, table, capsys):
    out_dir = tmp_path / "c"
    code, out, err = cli(capsys, "prepare", "cache", table, "--out", out_dir, "length=12", "--batch", 5)
    assert code == 0, err
    assert f"cached dataset 'procedural_hands' in {out_dir}" in out and "train: 12 samples of 32x32" in out
    code, out, err = cli(capsys, "prepare", "cache", table, "--out", out_dir)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    code, out, err = cli(capsys, "prepare", "cache", table, "--out", out_dir, "--overwrite", "length=7")
    assert code == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.")]  # no old or partial folder left
    code, out, err = cli(capsys, "inspect", "cached", f"path={out_dir}", "--num", 2, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["length"] == 7 and shown["class_names"] == source().class_names
    assert shown["samples"][0]["label"] == source().__getitems__([0])["label"][0].item()
    code, out, err = cli(capsys, "inspect", "cached", f"path={tmp_path / 'nowhere'}")
    assert code == 2 and "cache folder not found" in err and "handforge prepare cache" in err


def test_bad_arguments(tmp_path, table):
    with pytest.raises(HandforgeError, match="--batch must be at least 1"):
        prepare_cache(table, tmp_path / "c", batch=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(HandforgeError, match="exists and is not a folder"):
        prepare_cache(table, tmp_path / "file")
    prepare_cache(table, tmp_path / "c", limit=4)
    with pytest.raises(IndexError, match="out of range"):
        Cached(CachedConfig(path=str(tmp_path / "c")))[4]


def test_worker_batches_equal_in_process_batches(cache):
    dataset = Cached(CachedConfig(path=str(cache)))
    in_process = list(build_loader(dataset, batch_size=12, seed=3))
    in_worker = list(build_loader(dataset, batch_size=12, seed=3, num_workers=1))  # shared-memory output path
    for a, b in zip(in_process, in_worker, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A worker's batch travels as one shared-memory block (one handle, no copy at pickling).
    assert in_worker[0]["image"].is_shared()
    assert len({v.untyped_storage().data_ptr() for v in in_worker[0].values()}) == 1
