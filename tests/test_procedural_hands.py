"""The built-in procedural_hands dataset: contract, determinism, geometry, registration."""
import attrs
import pytest
import torch

from handforge.data import KEYPOINT_NAMES, build_loader, check_sample
from handforge.plugin_manager import PluginHost, PluginInfo
from handforge.recipe import structure
from handforge.plugins.datasets import procedural_hands
from handforge.plugins.datasets.procedural_hands import ProceduralHands, ProceduralHandsConfig, scene
from handforge.plugins.datasets.procedural_hands import raster as hand_render

TIPS = [KEYPOINT_NAMES.index(f"{f}4") for f in ("index", "middle", "ring", "pinky")]
MCPS = [KEYPOINT_NAMES.index(f"{f}1") for f in ("index", "middle", "ring", "pinky")]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(**options):
    return ProceduralHands(ProceduralHandsConfig(**options))


@pytest.fixture(scope="module")
def batch64():
    """256 samples at 64 px, with the hand mask."""
    ds = make(size=64)
    return ds.render(ds.sample_params(range(256)), with_mask=True)


def test_registration_through_the_hook():
    host = PluginHost()
    host._add(procedural_hands, PluginInfo("procedural_hands", "builtin", "handforge", "0"), fatal=True)
    entry = host.registry("dataset").get("procedural_hands")
    assert entry.factory is ProceduralHands and entry.config_cls is ProceduralHandsConfig
    assert entry.fields_provided(ProceduralHandsConfig()) == {
        "image", "label", "keypoints", "joints3d", "hand_pose", "handedness", "identity"}
    assert "reference" in entry.fields_provided(ProceduralHandsConfig(reference=True))
    assert entry.summary.startswith("Procedurally rendered hands")
    dataset = entry.factory(ProceduralHandsConfig(size=24, length=10), split="val")
    assert len(dataset) == 10 and dataset.image_size == 24


def test_config_is_validated():
    for bad in ({"size": 8}, {"size": 300}, {"left_fraction": 1.5}, {"background": "plaid"}, {"length": 0},
                {"classes": "klingon"}, {"hand_size": [0.5, 0.2]}, {"hand_size": [0.3]}, {"roll_jitter": 200.0}):
        with pytest.raises((ValueError, TypeError)):
            ProceduralHandsConfig(**bad)
    assert attrs.asdict(ProceduralHandsConfig())["size"] == 32
    # Recipe tables are structured by the core's strict converter, with located messages.
    problems = []
    config = structure({"size": 48, "background": "noise"}, ProceduralHandsConfig, "dataset", problems)
    assert problems == [] and config.size == 48 and config.background == "noise"
    structure({"size": "48", "background": "plaid", "colour": 1}, ProceduralHandsConfig, "dataset", problems)
    assert any("dataset.size" in p for p in problems) and any("dataset.background" in p for p in problems)
    assert any("dataset.colour: unknown key" in p for p in problems)
    with pytest.raises(ValueError):
        ProceduralHands(ProceduralHandsConfig(), split="test")


def test_samples_and_batches_follow_the_contract():
    ds = make(size=32, length=100)
    assert len(ds.class_names) == 18 and ds.class_names[:3] == ["call", "dislike", "fist"]
    sample = ds[3]
    check_sample(sample)
    assert sample["image"].shape == (3, 32, 32)
    batch = ds.__getitems__([0, 5, 99])
    check_sample(batch, batched=True)
    assert batch["image"].shape == (3, 3, 32, 32)
    assert set(batch) == {"image", "label", "keypoints", "joints3d", "hand_pose", "handedness", "identity"}
    assert batch["hand_pose"].shape == (3, 45)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    with pytest.raises(IndexError):
        ds[100]
    loader = build_loader(ds, batch_size=8, seed=0)
    first = next(iter(loader))
    check_sample(first, batched=True)
    assert first["image"].shape == (8, 3, 32, 32)


def test_a_sample_is_the_same_alone_and_anywhere_in_any_batch():
    ds = make(size=40, reference=True)
    big = ds.__getitems__(list(range(70)))
    shuffled = [69, 3, 41, 17, 0, 33, 64, 8]
    small = ds.__getitems__(shuffled)
    for j, i in enumerate(shuffled):
        alone = ds[i]
        for key in alone:
            assert torch.equal(alone[key], big[key][i]), (i, key)
            assert torch.equal(alone[key], small[key][j]), (i, key)
    again = make(size=40, reference=True).__getitems__(shuffled)
    assert all(torch.equal(again[k], small[k]) for k in small)


def test_seeds_and_splits_give_different_samples():
    a = make(seed=0).__getitems__(range(16))
    b = make(seed=1).__getitems__(range(16))
    val = ProceduralHands(ProceduralHandsConfig(seed=0), split="val").__getitems__(range(16))
    assert not torch.equal(a["image"], b["image"]) and not torch.equal(a["keypoints"], b["keypoints"])
    assert not torch.equal(a["image"], val["image"])
    assert (a["label"] != val["label"]).any()
    # Every class, both hands, many individuals over a few hundred samples.
    many = make(size=16).__getitems__(range(300))
    assert set(many["label"].tolist()) == set(range(18))
    assert set(many["handedness"].tolist()) == {0, 1}
    assert len(set(many["identity"].tolist())) > 100


def test_visible_keypoints_lie_in_the_image_and_on_the_hand(batch64):
    kp = batch64["keypoints"]
    visible = kp[..., 2] > 0
    assert set(kp[..., 2].unique().tolist()) <= {0.0, 1.0}
    assert visible.float().mean() > 0.7
    xy = kp[..., :2][visible]
    assert xy.min() >= 0 and xy.max() <= 1
    # The wrist and visible fingertips fall on hand pixels (3x3 neighbourhood of the keypoint).
    mask = torch.nn.functional.max_pool2d(batch64["mask"][:, None], 3, stride=1, padding=1)[:, 0]
    size = mask.shape[-1]
    for k in [0, KEYPOINT_NAMES.index("thumb4"), *TIPS]:
        rows = visible[:, k].nonzero().squeeze(1)
        x = (kp[rows, k, 0] * size).long().clamp(0, size - 1)
        y = (kp[rows, k, 1] * size).long().clamp(0, size - 1)
        on_hand = mask[rows, y, x] > 0.5
        assert on_hand.float().mean() > 0.97, (KEYPOINT_NAMES[k], on_hand.float().mean())
    # Keypoints outside the image are never visible.
    outside = ((kp[..., :2] < 0) | (kp[..., :2] > 1)).any(-1)
    assert not (outside & visible).any()


def test_some_keypoints_are_hidden_behind_the_hand():
    ds = make(size=64, view_jitter=80.0)
    kp = ds.__getitems__(range(200))["keypoints"]
    inside = ((kp[..., :2] >= 0) & (kp[..., :2] <= 1)).all(-1)
    assert ((kp[..., 2] == 0) & inside).any()


def tip_spread(kp):
    """Mean 2D distance of the four fingertips from the palm centre, over the palm's length."""
    xy = kp[..., :2]
    centre = (xy[:, 0] + xy[:, MCPS].mean(1)) / 2
    palm_length = (xy[:, MCPS[1]] - xy[:, 0]).norm(dim=-1)
    return (xy[:, TIPS] - centre[:, None]).norm(dim=-1).mean(1) / palm_length


def extension(joints3d, finger):
    """Tip-to-MCP distance over the finger's bone length: about 1 straight, well below curled."""
    base = KEYPOINT_NAMES.index(f"{finger}1")
    chain = joints3d[:, base:base + 4]
    bones = (chain[:, 1:] - chain[:, :-1]).norm(dim=-1).sum(1)
    return (chain[:, 3] - chain[:, 0]).norm(dim=-1) / bones


def exact(name, size=64, n=8, **options):
    """Samples of one class: exact template, upright palm-on view (plus options), right hands."""
    ds = make(size=size, pose_noise=0.0, view_jitter=0.0, roll_jitter=0.0, left_fraction=0.0, **options)
    label = ds.class_names.index(name)
    params = ds.sample_params(range(n))
    params["label"] = torch.full((n,), label)
    params["angles"] = ds.classes.templates[params["label"]]
    view = ds.classes.views[label] * (torch.pi / 180)
    params["roll"], params["yaw"], params["pitch"] = (view[i].expand(n) for i in range(3))
    return ds.render(params)


def test_handshapes_have_their_geometry(batch64):
    labels, kp, j3d = batch64["label"], batch64["keypoints"], batch64["joints3d"]
    names = make().class_names
    fist, palm, one = (labels == names.index(n) for n in ("fist", "palm", "one"))
    assert fist.sum() > 5 and palm.sum() > 5 and one.sum() > 5
    assert tip_spread(kp[fist]).max() < tip_spread(kp[palm]).min()
    ext = {f: extension(j3d[one], f) for f in ("index", "middle", "ring", "pinky")}
    assert ext["index"].min() > 0.9
    for finger in ("middle", "ring", "pinky"):
        assert ext[finger].max() < 0.7, finger
    # Fist: every fingertip within a palm's length of the palm's centre, in 3D.
    j = j3d[fist]
    palm_centre = (j[:, 0] + j[:, MCPS].mean(1)) / 2
    palm_length = (j[:, MCPS[1]] - j[:, 0]).norm(dim=-1)
    assert ((j[:, TIPS] - palm_centre[:, None]).norm(dim=-1) < 0.8 * palm_length[:, None]).all()


def test_oriented_classes_point_where_their_name_says():
    thumb_tip, thumb_mcp = KEYPOINT_NAMES.index("thumb4"), KEYPOINT_NAMES.index("thumb2")
    middle_tip = KEYPOINT_NAMES.index("middle4")
    for name, sign in (("like", 1), ("dislike", -1)):
        kp = exact(name)["keypoints"]
        rise = kp[:, thumb_mcp, 1] - kp[:, thumb_tip, 1]  # image y grows downwards
        run = (kp[:, thumb_mcp, 0] - kp[:, thumb_tip, 0]).abs()
        assert (sign * rise > 2 * run).all(), name  # the thumb points up (like) or down (dislike)
    for name in ("stop", "peace", "two_up"):
        up = exact(name)["keypoints"]
        down = exact(f"{name}_inverted")["keypoints"]
        assert (up[:, middle_tip, 1] < up[:, 0, 1]).all() and (down[:, middle_tip, 1] > down[:, 0, 1]).all()


def test_visibility_follows_the_view():
    """A palm seen from the front shows all 21 keypoints; a fist seen from its back hides the
    fingertips curled into the palm, and shows them from the front."""
    palm = exact("palm")["keypoints"]
    assert (palm[..., 2] == 1).all()
    front = exact("fist")["keypoints"]
    back = make(size=64, pose_noise=0.0, view_jitter=0.0, roll_jitter=0.0)
    params = back.sample_params(range(8))
    params["label"] = torch.full((8,), back.class_names.index("fist"))
    params["angles"] = back.classes.templates[params["label"]]
    params["yaw"] = torch.full((8,), torch.pi)
    hidden = back.render(params)["keypoints"]
    assert (front[:, TIPS, 2] == 1).float().mean() > 0.9
    assert (hidden[:, TIPS, 2] == 0).all()
    # Out of frame is never visible: a hand too large for the image, pushed to a corner.
    big = make(size=64, hand_size=[1.2, 1.2]).sample_params(range(16))
    big["shift"] = torch.full((16, 2), 0.45)
    kp = make(size=64, hand_size=[1.2, 1.2]).render(big)["keypoints"]
    outside = ((kp[..., :2] < 0) | (kp[..., :2] > 1)).any(-1)
    assert outside.any() and not (outside & (kp[..., 2] > 0)).any()


def test_reference_shows_the_same_individual_in_another_pose():
    ds = make(size=48, reference=True)
    out = ds.__getitems__(range(16))
    params = ds.sample_params(range(16))
    ref = ds.reference_params(params)
    for key in ("identity", "handedness", "skin", "hand_length", "finger_scale", "palm_scale", "bg_kind", "sleeve"):
        assert torch.equal(ref[key], params[key]), key
    assert not torch.equal(ref["angles"], params["angles"]) and not torch.equal(ref["roll"], params["roll"])
    rendered = ds.render(ref)
    assert torch.equal(out["reference"], rendered["image"])
    # the reference's own keypoints: where its hand is drawn, not the target's
    assert torch.equal(out["reference_keypoints"], rendered["keypoints"])
    assert (out["reference_keypoints"] - out["keypoints"]).abs().amax() > 0.01
    assert (out["reference"] - out["image"]).abs().mean() > 0.01
    assert "reference" not in make(size=48).__getitems__([0])


def test_fingerspelling_class_set():
    ds = make(size=32, classes="fingerspelling")
    assert ds.class_names[:3] == ["A", "B", "C"]
    labels = ds.__getitems__(range(200))["label"]
    assert set(labels.tolist()) == set(range(len(ds.class_names)))
    # The letters differ from each other: V spreads two fingers that U keeps together.
    def gap(name):
        kp = exact(name, classes="fingerspelling")["keypoints"]
        return (kp[:, 8, :2] - kp[:, 12, :2]).norm(dim=-1).mean()
    assert gap("V") > 1.5 * gap("U")


def test_a_left_hand_is_the_mirrored_right_hand():
    ds = make(size=48)
    params = ds.sample_params(range(12))
    params["handedness"] = torch.ones(12, dtype=torch.int64)
    right = ds.render(params, with_mask=True)
    params["handedness"] = torch.zeros(12, dtype=torch.int64)
    left = ds.render(params, with_mask=True)
    assert torch.equal(left["keypoints"][..., 0], 1.0 - right["keypoints"][..., 0])
    assert torch.equal(left["keypoints"][..., 1:], right["keypoints"][..., 1:])
    assert torch.equal(left["image"], right["image"].flip(-1))
    assert torch.equal(left["mask"], right["mask"].flip(-1))
    assert torch.equal(left["joints3d"][..., 0], -right["joints3d"][..., 0])
    # hand_pose of a left hand is in the mirrored (MANO left) frame: (x, -y, -z) per joint.
    assert torch.equal(left["hand_pose"], right["hand_pose"] * torch.tensor([1.0, -1.0, -1.0]).repeat(15))
    assert (left["handedness"] == 0).all() and (right["handedness"] == 1).all()


def test_joints_project_to_the_keypoints():
    ds = make(size=32)
    out = ds.__getitems__(range(32))
    j, kp = out["joints3d"], out["keypoints"]
    assert (j[..., 2] > 0.1).all()  # in front of the camera, in metres
    palm_length = (j[:, KEYPOINT_NAMES.index("middle1")] - j[:, 0]).norm(dim=-1)
    assert ((palm_length > 0.07) & (palm_length < 0.12)).all()
    focal = scene.FOCAL  # in image widths; the principal point is the image centre
    x = j[..., 0] / j[..., 2] * focal + 0.5
    y = j[..., 1] / j[..., 2] * focal + 0.5
    assert torch.allclose(x, kp[..., 0], atol=1e-5) and torch.allclose(y, kp[..., 1], atol=1e-5)


def test_background_kinds_and_identity_skin():
    ds = make(size=32, background="solid")
    params = ds.sample_params(range(8))
    assert (params["bg_kind"] == 0).all()
    solid = hand_render.background(params["bg_kind"], params["bg_colors"], torch.zeros(8, 2),
                                   params["bg_noise"], 32)
    assert torch.equal(solid, params["bg_colors"][:, 0, :, None, None].expand(8, 3, 32, 32))
    kinds = make(size=32).sample_params(range(64))["bg_kind"]
    assert set(kinds.tolist()) == {0, 1, 2, 3}
    # The same identity has the same proportions and skin in any sample.
    person = ds.identity_params(torch.tensor([5, 5, 9]))
    assert torch.equal(person["skin"][0], person["skin"][1])
    assert not torch.equal(person["skin"][0], person["skin"][2])
