"""The hand judge (plugins/metrics/judge): the worker protocol, the statistics, the error paths, the
environment it builds, and the hand_detector metric in `handforge evaluate` and in a run.

The default suite drives the real worker script through a stand-in Python (HANDFORGE_JUDGE_PYTHON)
that runs it with tests/fake_mediapipe on its path: a MediaPipe whose detections come from an
answer file, so every number below is known in advance. The slow tests install the real one.
"""
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli_exit
from handforge.errors import DataError, HandforgeError
from handforge.plugins.metrics.judge import environment
from handforge.plugins.metrics.judge.detector import WORKER, HandDetector
from handforge.plugins.metrics.judge.stats import keypoint_agreement, read_labels

FAKE_MEDIAPIPE = pathlib.Path(__file__).with_name("fake_mediapipe")
SIZE = 32
posix_only = pytest.mark.skipif(os.name == "nt", reason="stand-in executables are POSIX scripts")


def target_points() -> np.ndarray:
    """21 labelled points, normalized; their box is 0.5 of the image wide (16 px at 32 px)."""
    points = [(0.25 + 0.5 * (j % 5) / 4, 0.25 + 0.5 * (j // 5) / 4) for j in range(20)] + [(0.5, 0.5)]
    return np.array(points)


# x offsets of the detections: 0.02 -> 0.04 of the box (right at 0.1), 0.075 -> 0.15 (right at
# 0.2 only), 0.15 -> 0.3 (wrong at both).
PARTLY_WRONG = np.array([0.02] * 10 + [0.075] * 6 + [0.15] * 5)


def shifted(dx) -> list:
    points = target_points().copy()
    points[:, 0] += dx
    return points.tolist()


def pixels_key(path) -> str:
    with Image.open(path) as image:
        return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def write_fake_python(folder: pathlib.Path) -> pathlib.Path:
    """An executable that runs what it is given (``-I worker.py``) with the fake mediapipe importable."""
    path = folder / "fake-python"
    path.write_text(f"#!{sys.executable}\n"
                    "import runpy, sys\n"
                    "assert sys.argv[1] == '-I', sys.argv\n"
                    f"sys.path.insert(0, {str(FAKE_MEDIAPIPE)!r})\n"
                    "sys.argv = sys.argv[2:]\n"
                    "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    path.chmod(0o755)
    return path


def write_answers(folder: pathlib.Path, by_file: dict, default=None) -> pathlib.Path:
    answers = {"by_pixels": {pixels_key(path): answer for path, answer in by_file.items()}, "default": default}
    path = folder / "answers.json"
    path.write_text(json.dumps(answers))
    return path


@pytest.fixture
def fake_judge(tmp_path, monkeypatch):
    """The stand-in detector environment; returns a function that installs an answer file."""
    python = write_fake_python(tmp_path)
    monkeypatch.setenv(environment.PYTHON_VARIABLE, str(python))

    def answer(by_file: dict, default=None):
        monkeypatch.setenv("FAKE_MEDIAPIPE_ANSWERS", str(write_answers(tmp_path, by_file, default)))

    answer({})
    return answer


def label(class_id, name, hand, points=None, hidden=()):
    keypoints = [[x, y, 0 if j in hidden else 1] for j, (x, y) in enumerate(target_points() if points is None
                                                                          else points)]
    return {"label": class_id, "class_name": name, "keypoints": keypoints, "handedness": hand}


@pytest.fixture
def labelled_folder(tmp_path, fake_judge):
    """Six 32 px images in a `handforge prepare`-style folder and what the fake detector says of each.

    0 palm, right hand: found as "Left" (a right hand, MediaPipe mirrors), partly wrong landmarks
    1 palm, left hand: found as "Left" (wrong side), exact landmarks
    2 fist: no hand found
    3 fist: found with score 0.4 only (below the default 0.5), all landmarks 0.3 of the box off
    4 fist, left hand: found as "Right", exact landmarks
    5 not in labels.json: found
    """
    folder = tmp_path / "hands"
    folder.mkdir()
    files = []
    for i in range(6):
        path = folder / f"{i:06d}.png"
        Image.new("RGB", (SIZE, SIZE), (40 * i, 255 - 30 * i, 7 * i)).save(path)
        files.append(path)
    labels = {files[0].name: label(0, "palm", 1, hidden=(20,)), files[1].name: label(0, "palm", 0),
              files[2].name: label(1, "fist", 1), files[3].name: label(1, "fist", 0),
              files[4].name: label(1, "fist", 0)}
    (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "dataset.json").write_text(json.dumps({"class_names": ["palm", "fist"]}))
    fake_judge({files[0]: {"keypoints": shifted(PARTLY_WRONG), "handedness": "Left", "score": 0.9},
                files[1]: {"keypoints": shifted(0.0), "handedness": "Left", "score": 0.9},
                files[3]: {"keypoints": shifted(0.15), "handedness": "Right", "score": 0.4},
                files[4]: {"keypoints": shifted(0.0), "handedness": "Right", "score": 0.95},
                files[5]: {"keypoints": shifted(0.0), "handedness": "Left", "score": 0.8}})
    return folder


# -- the worker and its pipe ----------------------------------------------------------------------


def test_the_worker_answers_requests_line_by_line(labelled_folder, tmp_path):
    python = os.environ[environment.PYTHON_VARIABLE]
    files = sorted(labelled_folder.glob("*.png"))
    requests = [{"images": [str(files[0]), str(files[2])], "min_confidence": 0.5},
                {"folder": str(labelled_folder), "min_confidence": 0.3}]
    done = subprocess.run([python, "-I", str(WORKER)], input="".join(json.dumps(r) + "\n" for r in requests),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0] == {"ready": True, "protocol": 1, "mediapipe": "0.10.21+fake"}
    first, missed, end = lines[1:4]
    assert first["path"] == str(files[0]) and first["detected"] and first["handedness"] == "Left"
    assert (first["width"], first["height"]) == (SIZE, SIZE) and first["score"] == 0.9
    assert np.allclose(first["keypoints"], shifted(PARTLY_WRONG), atol=1e-6)
    assert missed == {"path": str(files[2]), "width": SIZE, "height": SIZE, "detected": False,
                      "handedness": None, "score": None, "keypoints": None}
    assert end == {"done": 2}
    # A folder request lists its images in sorted order; at 0.3 the 0.4-score hand counts.
    folder_lines = lines[4:]
    assert [line.get("path") for line in folder_lines[:-1]] == [str(f) for f in files]
    assert [line["detected"] for line in folder_lines[:-1]] == [True, True, False, True, True, True]
    assert folder_lines[-1] == {"done": 6}


def test_a_broken_request_stops_the_worker_with_a_message(fake_judge):
    python = os.environ[environment.PYTHON_VARIABLE]
    done = subprocess.run([python, "-I", str(WORKER)], input="{not json\n", capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3 and "bad request" in done.stderr


def test_tensors_travel_as_temporary_pngs(labelled_folder):
    files = sorted(labelled_folder.glob("*.png"))
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                          for f in files[:3]])
    with HandDetector(0.5) as detector:
        results = detector.detect_images(images)
        scratch = pathlib.Path(detector._scratch.name)
        assert scratch.is_dir() and not any(scratch.iterdir())  # each batch's files go once judged
        again = detector.detect_images(images[1:])  # one worker serves every batch
    assert not scratch.exists()
    assert [r["detected"] for r in results] == [True, True, False]
    assert [r["detected"] for r in again] == [True, False]
    assert np.allclose(results[1]["keypoints"], shifted(0.0), atol=1e-6)
    with HandDetector(0.3) as detector:  # the threshold reaches the detector
        assert detector.detect([files[3]])[0]["detected"]


# -- the statistics -------------------------------------------------------------------------------


def test_judge_reports_detection_pck_and_classes(labelled_folder, capsys):
    code, out, err = cli_exit(capsys, "judge", labelled_folder, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["images"], report["detected"], report["labelled"]) == (6, 4, 5)
    assert report["detection_rate"] == pytest.approx(4 / 6)
    # Images 0, 1 and 4 are labelled and found: 10 + 21 + 21 of 63 joints within 0.1 of the box,
    # 16 + 21 + 21 within 0.2; errors 10 x 0.04, 6 x 0.15, 5 x 0.3 and 42 x 0.
    assert report["labelled_and_detected"] == 3
    assert report["pck@0.1"] == pytest.approx(52 / 63)
    assert report["pck@0.2"] == pytest.approx(58 / 63)
    assert report["mean_error"] == pytest.approx((10 * 0.04 + 6 * 0.15 + 5 * 0.3) / 63)
    assert report["handedness_agreement"] == pytest.approx(2 / 3)
    assert report["per_class"] == {
        "fist": {"images": 3, "detected": 1, "detection_rate": pytest.approx(1 / 3), "pck@0.2": 1.0},
        "palm": {"images": 2, "detected": 2, "detection_rate": 1.0, "pck@0.2": pytest.approx(37 / 42)}}
    assert report["labels"] == str(labelled_folder / "labels.json")
    assert report["detector"]["mediapipe"] == "0.10.21+fake"

    code, out, _ = cli_exit(capsys, "judge", labelled_folder, "--min-confidence", "0.3")
    assert code == 0
    assert "detected                5 / 6  (83.3%)" in out  # image 3 counts now
    assert "PCK@0.2 (bbox)          0.690" in out  # (16 + 21 + 0 + 21) / 84: image 3 is all wrong


def test_visible_only_follows_mmpose_per_joint_means(labelled_folder, capsys):
    code, out, _ = cli_exit(capsys, "judge", labelled_folder, "--visible-only", "--json")
    report = json.loads(out)
    # Joint 20 of image 0 (0.3 of the box off) is hidden: per joint, the fraction right among the
    # images where it is visible, then the mean over joints.
    errors = np.stack([np.abs(PARTLY_WRONG) / 0.5, np.zeros(21), np.zeros(21)])
    visible = np.ones((3, 21), bool)
    visible[0, 20] = False
    for t in (0.1, 0.2):
        per_joint = [(errors[visible[:, j], j] < t).mean() for j in range(21)]
        assert report[f"pck@{t}"] == pytest.approx(np.mean(per_joint))
    assert report["mean_error"] == pytest.approx(errors[visible].mean())


def test_boxes_and_errors_are_measured_in_pixels():
    # A 40x20 image: the labelled box is 0.5 x 0.5 of the image, 20 x 10 px, so its side is 20 px;
    # landmarks 0.15 of the image low are 3 px = 0.15 of that side off (in normalized units it
    # would read 0.3). A second, 32 px image in the same call is exact.
    target = np.zeros((2, 21, 3))
    target[:, :, 2] = 1
    target[:, :, :2] = target_points()
    target[:, :, 1] = 0.25 + 0.5 * np.linspace(0, 1, 21)  # y spans 0.5 too
    found = target[:, :, :2].copy()
    found[0, :, 1] += 0.15
    values = keypoint_agreement(found, target, [(20, 40), (32, 32)])
    assert values["pck@0.1"] == pytest.approx(0.5) and values["pck@0.2"] == pytest.approx(1.0)
    assert values["mean_error"] == pytest.approx(0.15 / 2)
    assert values["measured"] == 2


def test_labels_files_in_the_formats_judge_reads(tmp_path):
    points = target_points()
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"a.png": points.tolist(), "b.png": points.flatten().tolist(),
                                "c.png": {"keypoints": [[x, y, 0] for x, y in points], "class_name": "ok"},
                                "d.png": {"class_name": "fist"}}))
    labels = read_labels(path)
    assert np.allclose(labels["a.png"].keypoints[:, :2], points) and (labels["a.png"].keypoints[:, 2] == 1).all()
    assert np.allclose(labels["b.png"].keypoints, labels["a.png"].keypoints)
    assert labels["c.png"].class_name == "ok" and (labels["c.png"].keypoints[:, 2] == 0).all()
    assert labels["d.png"].keypoints is None and labels["d.png"].class_name == "fist"
    path.write_text(json.dumps({"a.png": {"keypoints": points[:20].tolist()}}))
    with pytest.raises(DataError, match=r"labels.json: 'a.png'.keypoints: keypoints must be 21 points .* shape \(20, 2\)"):
        read_labels(path)


# -- what goes wrong ------------------------------------------------------------------------------


def test_folder_errors_exit_2_with_one_line(tmp_path, capsys, fake_judge):
    code, _, err = cli_exit(capsys, "judge", tmp_path / "nowhere")
    assert code == 2 and "judge: " in err and "nowhere: no such folder" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code, _, err = cli_exit(capsys, "judge", tmp_path / "empty")
    assert code == 2 and "empty: no image files" in err
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / "a.png")
    code, _, err = cli_exit(capsys, "judge", tmp_path / "empty", "--keypoints", tmp_path / "missing.json")
    assert code == 2 and "--keypoints" in err and "missing.json: no such file" in err
    code, _, err = cli_exit(capsys, "judge", tmp_path / "empty", "--min-confidence", "1.5")
    assert code == 2 and "--min-confidence must be between 0 and 1" in err


def test_an_unreadable_image_is_named_or_counted(labelled_folder, capsys):
    (labelled_folder / "broken.png").write_bytes(b"not a png")
    code, _, err = cli_exit(capsys, "judge", labelled_folder)
    assert code == 2 and "broken.png: cannot read the image" in err and "--skip-bad" in err
    code, out, err = cli_exit(capsys, "judge", labelled_folder, "--skip-bad", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["unreadable"], report["images"], report["detected"]) == (1, 6, 4)


def test_a_worker_crash_shows_its_stderr(labelled_folder, capsys, fake_judge):
    files = sorted(labelled_folder.glob("*.png"))
    fake_judge({files[2]: {"crash": "Segmentation fault in the fake landmark model"}})
    code, _, err = cli_exit(capsys, "judge", labelled_folder)
    assert code == 2
    assert "the worker" in err and "stopped with exit code 7 while judging image 3 of 6" in err
    assert "Segmentation fault in the fake landmark model" in err and "Traceback" not in err


def test_a_python_without_the_worker_protocol_is_refused(labelled_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(environment.PYTHON_VARIABLE, str(tmp_path / "no-such-python"))
    code, _, err = cli_exit(capsys, "judge", labelled_folder)
    assert code == 2 and "HANDFORGE_JUDGE_PYTHON=" in err and "no such file" in err
    # A Python without mediapipe: the worker's import error comes back, tail and all.
    monkeypatch.setenv(environment.PYTHON_VARIABLE, sys.executable)
    code, _, err = cli_exit(capsys, "judge", labelled_folder)
    assert code == 2 and "while starting" in err and "No module named 'mediapipe'" in err


# -- the environment it builds --------------------------------------------------------------------


def fake_venv(script: str):
    """A stand-in for ``python -m venv``: the environment's python is ``script`` (sh)."""
    def create(folder):
        python = environment.env_python(folder)
        python.parent.mkdir(parents=True)
        python.write_text("#!/bin/sh\n" + script)
        python.chmod(0o755)
        (folder / "pyvenv.cfg").write_text("home = /nowhere\n")
    return create


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv(environment.PYTHON_VARIABLE, raising=False)
    monkeypatch.setenv("HANDFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@posix_only
def test_an_unreachable_registry_gives_one_message(cache, labelled_folder, capsys, monkeypatch):
    monkeypatch.delenv(environment.PYTHON_VARIABLE, raising=False)  # labelled_folder set it
    monkeypatch.setattr(environment, "create_venv", fake_venv(
        'if [ "$2" = pip ] && [ "$3" = install ]; then\n'
        '  echo "WARNING: Retrying (Retry(total=0)) after connection broken by NewConnectionError" >&2\n'
        '  echo "ERROR: Could not find a version that satisfies the requirement numpy==1.26.4 (from versions: none)" >&2\n'
        '  exit 1\nfi\nexit 0\n'))
    code, out, err = cli_exit(capsys, "judge", labelled_folder)
    assert code == 2 and out == ""
    assert "creating the hand judge's environment (one time" in err
    message = err.splitlines()[1:]
    assert message[0].startswith("handforge: error: could not build the hand judge's environment in "
                                 f"{cache / environment.ENV_NAME}: installing mediapipe's dependencies")
    assert "exited with code 1" in message[0]
    assert any("Could not find a version that satisfies the requirement numpy==1.26.4" in m for m in message)
    assert "run the command again" in err and "HANDFORGE_JUDGE_PYTHON=/path/to/python" in err
    # Nothing that looks like an environment is left behind.
    assert sorted(p.name for p in cache.iterdir()) == [f".{environment.ENV_NAME}.lock"]


@posix_only
def test_the_environment_is_built_once_atomically_and_reused(cache, monkeypatch, capsys):
    calls = cache.parent / "calls.txt"
    monkeypatch.setattr(environment, "create_venv", fake_venv(
        f'echo "$@" >> {calls}\n'
        'if [ "$3" = freeze ]; then echo mediapipe==0.10.21; echo numpy==1.26.4; fi\nexit 0\n'))
    final = cache / environment.ENV_NAME
    # What killed builds leave: a staging folder, and a final folder without a marker.
    stale = cache / f".{environment.ENV_NAME}.abc.partial"
    (stale / "bin").mkdir(parents=True)
    (final / "bin").mkdir(parents=True)
    (final / "bin" / "python").write_text("not a finished environment")

    python = environment.judge_python()
    assert python == final / "bin" / "python"
    marker = json.loads((final / environment.MARKER).read_text())
    assert marker["requested"] == environment.requested()
    assert marker["installed"] == ["mediapipe==0.10.21", "numpy==1.26.4"]
    assert not stale.exists() and not list(cache.glob("*.partial"))
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("-m pip install --quiet numpy==1.26.4 ")
    assert lines[1] == "-m pip install --quiet --no-deps mediapipe==0.10.21"
    assert lines[2] == "-I -c import mediapipe.python.solutions.hands"
    assert "creating the hand judge's environment (one time, ~140 MB download" in capsys.readouterr().err

    # Complete now: used as it is, offline; an outdated marker means a rebuild.
    monkeypatch.setattr(environment, "create_venv", lambda folder: pytest.fail("rebuilt a complete environment"))
    assert environment.judge_python() == python
    marker["requested"]["mediapipe"] = ["mediapipe==0.10.14"]
    (final / environment.MARKER).write_text(json.dumps(marker))
    assert not environment.is_complete(final)


@posix_only
def test_an_interrupted_build_leaves_nothing(cache, monkeypatch):
    def interrupted(folder):
        fake_venv("exit 0\n")(folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(environment, "create_venv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        environment.judge_python()
    assert sorted(p.name for p in cache.iterdir()) == [f".{environment.ENV_NAME}.lock"]


# -- the metric -----------------------------------------------------------------------------------


def test_hand_detector_in_evaluate(labelled_folder, capsys):
    # The folder source reads the images labels.json names (0-4) with their keypoints.
    code, out, err = cli_exit(capsys, "evaluate", "--fake", labelled_folder, "--metrics", "hand_detector",
                              "--json", "--batch-size", "2")
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert metrics == {"hand_detector/detected": pytest.approx(3 / 5), "hand_detector/pck@0.1": pytest.approx(52 / 63),
                       "hand_detector/pck@0.2": pytest.approx(58 / 63),
                       "hand_detector/error": pytest.approx((10 * 0.04 + 6 * 0.15 + 5 * 0.3) / 63)}


def test_hand_detector_without_keypoints_reports_detection(labelled_folder, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    for path in sorted(labelled_folder.glob("*.png")):
        (plain / path.name).write_bytes(path.read_bytes())
    code, out, err = cli_exit(capsys, "evaluate", "--fake", plain, "--metrics", "hand_detector", "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"] == {"hand_detector/detected": pytest.approx(4 / 6)}


def test_hand_detector_in_a_pose_gan_run(fake_judge, tmp_path):
    from handforge.plugin_manager import PluginHost
    from handforge.recipe import resolve
    from test_generate import tiny_raw, train

    # Every image "shows" the same hand: PCK then measures those landmarks against the keypoints
    # of the run dataset's samples 0..11, which conditioned the fakes and belong to the reals.
    found = np.array(shifted(0.0))
    fake_judge({}, default={"keypoints": found.tolist(), "handedness": "Left", "score": 0.9})
    raw = tiny_raw(tmp_path, "posegan", pose=True)
    raw["eval"] = {"every": 2, "metrics": [{"name": "hand_detector", "num_samples": 12, "batch_size": 5,
                                           "reference": True}]}
    run_dir = train(raw)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r.get("type") == "eval"]

    host = PluginHost()
    host.load_builtins()
    dataset = resolve(raw, host=host).data.build(split="train")
    target = torch.stack([dataset[i]["keypoints"] for i in range(12)]).double().numpy()
    side = SIZE * np.ptp(target[..., :2], axis=1).max(axis=1)  # each sample's box, px
    errors = np.linalg.norm((found[None] - target[..., :2]) * SIZE, axis=-1) / side[:, None]
    for prefix in ("hand_detector/", "hand_detector_real/"):
        assert record[prefix + "detected"] == 1.0
        assert record[prefix + "pck@0.1"] == pytest.approx((errors < 0.1).mean())
        assert record[prefix + "pck@0.2"] == pytest.approx((errors < 0.2).mean())
        assert record[prefix + "error"] == pytest.approx(errors.mean())


def test_the_metric_options_are_checked(host):
    from handforge.errors import RecipeError
    from handforge.recipe import resolve_component

    with pytest.raises(RecipeError, match="min_confidence: must be between 0 and 1"):
        resolve_component({"name": "hand_detector", "min_confidence": 2.0}, "metric", "eval.metrics[0]", host=host)


# -- the real detector ----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_real_environment_installs_and_judges_renders(tmp_path, monkeypatch, capsys):
    """Builds MediaPipe's environment from the package registry (~140 MB), then judges 12 renders."""
    monkeypatch.delenv(environment.PYTHON_VARIABLE, raising=False)
    monkeypatch.setenv("HANDFORGE_CACHE", str(tmp_path / "cache"))
    code, _, err = cli_exit(capsys, "prepare", "procedural_hands", "--num", "12", "--size", "224", "--seed", "0",
                            "--out", tmp_path / "hands")
    assert code == 0, err
    code, out, err = cli_exit(capsys, "judge", tmp_path / "hands", "--json")
    assert code == 0, err
    assert "creating the hand judge's environment" in err
    report = json.loads(out)
    assert report["detector"]["mediapipe"] == "0.10.21"
    # At 224 px with default options the detector finds about 86% of the hands, landmarks PCK@0.2
    # about 0.95 (README); 12 images leave room for chance.
    assert report["detected"] >= 7 and report["pck@0.2"] > 0.85
    assert environment.is_complete(tmp_path / "cache" / environment.ENV_NAME)


@pytest.mark.slow
@posix_only
def test_real_pip_against_an_unreachable_index(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(environment.PYTHON_VARIABLE, raising=False)
    monkeypatch.setenv("HANDFORGE_CACHE", str(tmp_path / "cache"))
    for name, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0",
                        "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1", "PIP_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(HandforgeError, match="installing mediapipe's dependencies.*exited with code 1"):
        environment.judge_python()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f".{environment.ENV_NAME}.lock"]


@pytest.mark.slow
@posix_only
def test_two_processes_judge_their_shares_and_agree(fake_judge, tmp_path):
    """The quickstart's pose GAN under `accelerate launch` with 2 processes: each judges its share of
    13 fakes (6 and 7) in its own worker; the gathered numbers are those of all 13, in order."""
    from conftest import REPO, launch_two_processes

    found = np.array(shifted(0.0))
    fake_judge({}, default={"keypoints": found.tolist(), "handedness": "Left", "score": 0.9})
    metric = '{name = "hand_detector", num_samples = 13, batch_size = 4}'
    result = launch_two_processes(REPO / "run.py", "run", REPO / "recipes" / "quickstart.toml",
                                  f"output_dir={tmp_path / 'runs'}", "train.steps=2", "train.batch_size=4",
                                  "train.progress=false", "train.tensorboard=false", "eval.every=2",
                                  f"eval.metrics=[{metric}]")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r.get("type") == "eval"]

    from handforge.recipe import load_recipe

    dataset = load_recipe(REPO / "recipes" / "quickstart.toml").data.build(split="train")
    size = dataset[0]["image"].shape[-1]
    target = torch.stack([dataset[i]["keypoints"] for i in range(13)]).double().numpy()
    side = size * np.ptp(target[..., :2], axis=1).max(axis=1)
    errors = np.linalg.norm((found[None] - target[..., :2]) * size, axis=-1) / side[:, None]
    assert record["hand_detector/detected"] == 1.0
    assert record["hand_detector/pck@0.2"] == pytest.approx((errors < 0.2).mean())
    assert record["hand_detector/error"] == pytest.approx(errors.mean())
