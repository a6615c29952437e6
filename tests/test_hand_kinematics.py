"""The kinematic hand of procedural_hands: axis-angle poses, forward kinematics, handshapes."""
import math

import pytest
import torch

from handforge.data import KEYPOINT_NAMES, KEYPOINT_PARENTS
from handforge.plugins.datasets.procedural_hands import handshapes
from handforge.plugins.datasets.procedural_hands import kinematics as kin

HAGRID_V1 = ["call", "dislike", "fist", "four", "like", "mute", "ok", "one", "palm", "peace",
             "peace_inverted", "rock", "stop", "stop_inverted", "three", "three2", "two_up", "two_up_inverted"]


def skeletons(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(b, 7, generator=g)
    return kin.rest_skeleton(0.9 + 0.2 * u[:, 0], 0.9 + 0.2 * u[:, 1], 0.95 + 0.1 * u[:, 2:])


def bone_lengths(joints):
    parents = torch.tensor(KEYPOINT_PARENTS[1:])
    return (joints[:, 1:] - joints[:, parents]).norm(dim=-1)


def skew(v):
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).view(*v.shape[:-1], 3, 3)


def test_rodrigues_matches_the_matrix_exponential():
    v = torch.randn(200, 3, dtype=torch.float64).float() * 1.5
    v[:5] *= 1e-8  # near-zero rotations take the series branch
    reference = torch.linalg.matrix_exp(skew(v.double())).float()
    assert torch.allclose(kin.axis_angle_to_matrix(v), reference, atol=2e-6)


def test_element_wise_trigonometry_matches_torch():
    x = torch.linspace(-7, 7, 10001)  # angles in use: within +-2 pi
    sin, cos = kin.sincos(x)
    assert torch.allclose(sin, torch.sin(x), atol=1e-6) and torch.allclose(cos, torch.cos(x), atol=1e-6)
    y, w = torch.rand(5000) * 3, torch.rand(5000) * 3
    assert torch.allclose(kin.atan2_nonneg(y, w), torch.atan2(y, w), atol=3e-7)
    assert kin.atan2_nonneg(torch.zeros(1), torch.zeros(1)).item() == 0.0


def test_anatomical_angles_compose_as_splay_bend_twist_about_the_joint_axes():
    angles = (torch.rand(64, 15, 3) * 2 - 1) * 80
    pose = kin.anatomical_to_pose(angles)
    assert pose.shape == (64, 45)
    got = kin.axis_angle_to_matrix(pose.view(64, 15, 3)).double()
    # A second implementation: the matrix exponential of each elementary rotation, multiplied.
    axes = kin.JOINT_AXES.double()
    rad = angles.double() * math.pi / 180
    elementary = [torch.linalg.matrix_exp(skew(axes[:, k] * rad[..., k, None])) for k in range(3)]
    want = elementary[1] @ elementary[0] @ elementary[2]
    assert torch.allclose(got, want, atol=2e-6)
    # Angles stay below pi, so the rotation vector is unique.
    assert pose.view(64, 15, 3).norm(dim=-1).max() <= math.pi


def test_the_zero_pose_is_the_flat_rest_hand_and_bones_keep_their_length():
    rest = skeletons(16)
    joints, frames = kin.forward_kinematics(torch.zeros(16, 45), rest)
    assert torch.equal(joints, rest)
    assert torch.allclose(frames, torch.eye(3).expand(16, 21, 3, 3))
    pose = torch.randn(16, 45) * 0.8  # any pose, even outside the joint limits
    posed, frames = kin.forward_kinematics(pose, rest)
    assert torch.allclose(bone_lengths(posed), bone_lengths(rest), atol=1e-5)
    assert torch.equal(posed[:, [0, 1, 5, 9, 13, 17]], rest[:, [0, 1, 5, 9, 13, 17]])  # wrist, CMC, MCPs fixed
    # Frames are rotations.
    eye = frames @ frames.transpose(-1, -2)
    assert torch.allclose(eye, torch.eye(3).expand_as(eye), atol=1e-5)


def test_forward_kinematics_follows_the_mano_chain():
    """Turning index1 (MANO joint 0) moves the index PIP, DIP and tip about the MCP, nothing else."""
    rest = skeletons(1)
    pose = torch.zeros(1, 45)
    pose[0, 0:3] = torch.tensor([0.0, 0.0, 0.5])
    joints, _ = kin.forward_kinematics(pose, rest)
    moved = (joints - rest).norm(dim=-1)[0] > 1e-6
    assert moved.nonzero().squeeze(1).tolist() == [6, 7, 8]
    r = kin.axis_angle_to_matrix(pose[0, :3])
    assert torch.allclose(joints[0, 8] - joints[0, 5], r @ (rest[0, 8] - rest[0, 5]), atol=1e-6)
    # thumb1 (MANO joint 12) moves the thumb MCP, IP and tip.
    pose = torch.zeros(1, 45)
    pose[0, 36:39] = 0.4
    joints, _ = kin.forward_kinematics(pose, rest)
    moved = (joints - rest).norm(dim=-1)[0] > 1e-6
    assert moved.nonzero().squeeze(1).tolist() == [2, 3, 4]
    assert [kin.JOINT_KEYPOINT[i] for i in (0, 3, 6, 9, 12)] == [5, 9, 17, 13, 1]


def test_a_mirrored_pose_gives_the_mirrored_hand():
    rest = skeletons(8)
    pose = torch.randn(8, 45) * 0.6
    right, _ = kin.forward_kinematics(pose, rest)
    mirror = torch.tensor([-1.0, 1.0, 1.0])
    left, _ = kin.forward_kinematics(pose * torch.tensor([1.0, -1.0, -1.0]).repeat(15), rest * mirror)
    assert torch.allclose(left, right * mirror, atol=1e-6)


def test_bend_angles_respect_the_joint_limits():
    """Angles measured between bones of posed templates with maximal noise stay inside the limits."""
    classes = handshapes.ClassSet("hagrid")
    noise = torch.randn(400, 15, 3).clamp(-3, 3) * handshapes.ANGLE_NOISE * 3
    angles = classes.templates[torch.arange(400) % len(classes.names)] + noise
    clamped = torch.minimum(torch.maximum(angles, handshapes.ANGLE_LO), handshapes.ANGLE_HI)
    joints, _ = kin.forward_kinematics(kin.anatomical_to_pose(clamped), skeletons(400))
    for finger in ("index", "middle", "ring", "pinky"):
        base = KEYPOINT_NAMES.index(f"{finger}1")
        pip = kin.bone_angle(joints[:, base], joints[:, base + 1], joints[:, base + 2])
        dip = kin.bone_angle(joints[:, base + 1], joints[:, base + 2], joints[:, base + 3])
        # PIP/DIP: bend up to 115/85 degrees; the small splay and twist add a little.
        assert pip.max() <= 116.0 and dip.max() <= 86.0, finger
    # The MCP bends no further than 95 degrees out of the palm plane.
    mcp = joints[:, [5, 9, 13, 17]]
    pip = joints[:, [6, 10, 14, 18]]
    out_of_plane = torch.rad2deg(torch.asin(((pip - mcp)[..., 2] / (pip - mcp).norm(dim=-1)).clamp(-1, 1)))
    assert out_of_plane.max() <= 90.0 and out_of_plane.min() >= -26.0


def test_class_sets():
    hagrid = handshapes.ClassSet("hagrid")
    assert list(hagrid.names) == HAGRID_V1  # HaGRID's own label order
    assert set(handshapes.OPEN_CLASSES) <= set(HAGRID_V1)
    spelling = handshapes.ClassSet("fingerspelling")
    assert len(spelling.names) >= 12 and all(len(n) == 1 for n in spelling.names)
    for classes in (hagrid, spelling):
        assert classes.templates.shape == (len(classes.names), 15, 3)
        assert classes.views.shape == (len(classes.names), 3)
    with pytest.raises(KeyError):
        handshapes.ClassSet("klingon")
