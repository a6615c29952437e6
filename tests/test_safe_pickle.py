"""The one reader of pickles from users' files: plain data comes back exactly as numpy's own
(trusted) loader gives it; a pickle that would run code is refused and runs nothing."""
import os
import pickle

import numpy as np
import pytest

from handforge import safe_pickle
from handforge.errors import DataError


def nested():
    return {"lhand": {"params": {"fullpose": np.arange(90, dtype=np.float32).reshape(2, 45)}},
            "n_frames": 2, "names": ["a", "b"], "scale": np.float64(1.5), "pair": (1, 2.0)}


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b and type(a) is type(b)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_data_round_trips_as_numpy_reads_it(protocol):
    data = pickle.dumps(nested(), protocol=protocol)
    assert_same(safe_pickle.loads(data, "x.pkl"), pickle.loads(data))


def test_npz_with_object_members_reads_like_numpy_with_allow_pickle(tmp_path):
    # GRAB's layout: each top-level key of the .npz is a pickled dict (an object array).
    path = tmp_path / "s1_apple.npz"
    np.savez(path, lhand=np.array(nested()["lhand"], dtype=object), framerate=np.float32(120),
             poses=np.ones((3, 156), np.float32))
    ours = safe_pickle.load_npz(path)
    with np.load(path, allow_pickle=True) as trusted:  # the reference, on a file we wrote
        assert_same(ours["lhand"], trusted["lhand"].item())
        assert_same(ours["poses"], trusted["poses"])
        assert ours["framerate"] == trusted["framerate"]


def test_npy_of_a_dict_and_of_a_fortran_array(tmp_path):
    # ARCTIC's .mano.npy: np.save of a dict.
    np.save(tmp_path / "a.npy", {"right": {"pose": np.zeros((4, 45), np.float32)}}, allow_pickle=True)
    assert safe_pickle.load_npy_file(tmp_path / "a.npy")["right"]["pose"].shape == (4, 45)
    array = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    np.save(tmp_path / "f.npy", array)
    assert np.array_equal(safe_pickle.load_npy_file(tmp_path / "f.npy"), array)


class WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsCommand:
    def __reduce__(self):
        return (os.system, ("echo planted",))


@pytest.mark.parametrize("make", [lambda m: WritesMarker(str(m)), lambda m: RunsCommand(),
                                  lambda m: {"pose": np.zeros(3), "payload": WritesMarker(str(m))}])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, make):
    marker = tmp_path / "marker"
    path = tmp_path / "seq.keypoints.pkl"
    path.write_bytes(pickle.dumps(make(marker)))
    with pytest.raises(DataError, match=r"seq\.keypoints\.pkl: the pickle names (builtins|io|posix|os|nt)\.\w+"):
        safe_pickle.load_file(path)
    assert not marker.exists()


def test_a_planted_object_array_in_an_npz_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "planted.npz"
    np.savez(path, lhand=np.array([WritesMarker(str(marker))], dtype=object))
    with pytest.raises(DataError, match=r"planted\.npz member 'lhand': the pickle names"):
        safe_pickle.load_npz(path)
    assert not marker.exists()


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((100, 45), np.float32))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"t\.npy: truncated \.npy array"):
        safe_pickle.load_npy_file(tmp_path / "t.npy")
    (tmp_path / "g.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"g\.npz: not a readable \.npz"):
        safe_pickle.load_npz(tmp_path / "g.npz")
    with pytest.raises(DataError, match=r"x\.pkl: not a readable pickle"):
        safe_pickle.loads(pickle.dumps(nested())[:-5], "x.pkl")
