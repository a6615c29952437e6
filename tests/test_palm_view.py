"""procedural_hands' palm view: open palms to the camera with each individual's palm creases."""
import math

import pytest
import torch

from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig
from handforge.plugins.datasets.procedural_hands.creases import crease_params

pytestmark = pytest.mark.usefixtures("one_thread")


def palms(**options):
    return ProceduralHands(ProceduralHandsConfig(**{"size": 64, "view": "palm", "identities": 8, **options}))


def test_view_is_validated_and_palm_is_one_open_centred_class():
    with pytest.raises((ValueError, TypeError)):
        ProceduralHandsConfig(view="side")
    ds = palms(view_jitter=0.0, roll_jitter=0.0, left_fraction=0.0)
    assert ds.class_names == ["palm"]
    p = ds.sample_params(range(32))
    assert (p["label"] == 0).all() and (p["shift"] == 0).all()
    out = ds.render(p)
    # The palm faces the camera: the palm-side normal (the rotated hand +z) points at the viewer,
    # so every keypoint is seen, and the fingers spread open above the wrist.
    assert out["keypoints"][..., 2].all()
    wrist, tips = out["keypoints"][:, 0, :2], out["keypoints"][:, 8::4, :2]
    assert (tips[..., 1] < wrist[:, None, 1] - 0.2).all()
    box_centre = (out["keypoints"][..., :2].amin(1) + out["keypoints"][..., :2].amax(1)) / 2
    assert (box_centre - 0.5).abs().max() < 0.02  # centred (shift 0: the box centre on the optical axis)


def test_creases_are_a_function_of_identity_and_dataset_seed():
    ds = palms()
    p = ds.sample_params(range(200))
    for key in ("creases", "crease_depth", "crease_width"):
        for identity in p["identity"].unique():
            rows = p[key][p["identity"] == identity]
            assert (rows == rows[:1]).all(), key
    first = p["identity"] == p["identity"][0]
    other = p["identity"] != p["identity"][0]
    assert (p["creases"][first][0] - p["creases"][other][0]).abs().max() > 0.01
    # The same identity in the val split and in a reference render keeps its lines.
    val = palms().__class__(ProceduralHandsConfig(size=64, view="palm", identities=8), split="val")
    q = val.sample_params(range(200))
    same = q["identity"] == p["identity"][0]
    assert torch.equal(q["creases"][same][0], p["creases"][first][0])
    assert torch.equal(ds.reference_params(p)["creases"], p["creases"])
    # Another dataset seed, other individuals.
    again = palms(seed=1).identity_params(p["identity"][:1])
    assert (again["creases"] - p["creases"][:1]).abs().max() > 0.01
    # Heart above head, life line reaching down towards the wrist (hand frame, y up the palm).
    c = p["creases"]
    assert (c[:, 0, :, 1].mean(1) > c[:, 1, :, 1].mean(1)).all()
    assert (c[:, 2, -1, 1] < 0.12).all()


def with_creases_off(p):
    return {**p, "crease_depth": torch.zeros_like(p["crease_depth"])}


def test_creases_darken_the_palm_only_where_it_faces_the_camera():
    ds = palms(left_fraction=0.0, background="solid")
    p = ds.sample_params(range(8))
    on, mask = ds.render(p, with_mask=True)["image"], ds.render(p, with_mask=True)["mask"]
    off = ds.render(with_creases_off(p))["image"]
    changed = (on - off).abs().amax(1) > 1e-6
    assert changed.flatten(1).sum(1).min() > 20  # every palm shows its lines
    assert (on <= off + 1e-6).all()  # creases only darken
    assert (mask[changed] > 0).all()  # ... and only the hand
    # Turned round, the camera sees the back of the hand: no creases at all.
    back = {**p, "yaw": p["yaw"] + math.pi}
    assert torch.equal(ds.render(back)["image"], ds.render(with_creases_off(back))["image"])


def test_a_palm_sample_is_the_same_alone_and_in_any_batch():
    ds = palms(size=48)
    batch = ds.__getitems__(list(range(12)))
    for i in (0, 7, 11):
        alone = ds[i]
        assert torch.equal(alone["image"], batch["image"][i]) and alone["identity"] == batch["identity"][i]


def test_crease_params_are_batch_independent():
    from handforge.plugins.datasets.procedural_hands import counter_rng as rng

    key = rng.stream(3, 7)
    ids = torch.arange(40)
    together = crease_params(key, ids)
    for i in (0, 13, 39):
        alone = crease_params(key, ids[i:i + 1])
        assert all(torch.equal(alone[k][0], together[k][i]) for k in together)
