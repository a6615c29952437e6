"""The unet denoiser: parameter count by closed form, shapes at several sizes, the size/role errors,
the conditioners' denoiser side (class embedding, pose maps, drop for guidance), and, when the
benchmark-only extra denoising-diffusion-pytorch is installed, the peer's weights giving the
peer's output."""
import pytest
import torch

from conftest import run_cli
from handforge.errors import HandforgeError
from handforge.plugins.backbones.unet import UnetConfig, build_unet
from handforge.plugins.conditioners.label import ClassBatchNorm, NoCondition
from handforge.plugins.conditioners.pose import ConcatConditioner, PoseMapsConfig
from handforge.toml_writer import dumps

from peer_ddpm import import_peer

pytestmark = pytest.mark.usefixtures("one_thread")


def closed_form_params(dim, mults, channels=3, heads=4, dim_head=32, mem=4, in_extra=0):
    """The peer's Unet layout counted by hand: conv = k*k*cin*cout + cout, rms gain = c."""
    conv = lambda k, a, b, bias=True: k * k * a * b + (b if bias else 0)  # noqa: E731
    t = 4 * dim
    res = lambda a, b: (t * 2 * b + 2 * b) + conv(3, a, b) + b + conv(3, b, b) + b + (conv(1, a, b) if a != b else 0)  # noqa: E731
    hid = heads * dim_head
    full = lambda c: c + 2 * heads * mem * dim_head + conv(1, c, 3 * hid, False) + conv(1, hid, c)  # noqa: E731
    lin = lambda c: full(c) + c  # plus the RMS norm after its output conv  # noqa: E731
    dims = [dim] + [dim * m for m in mults]
    pairs = list(zip(dims[:-1], dims[1:]))
    last = len(pairs) - 1
    n = conv(7, channels + in_extra, dim) + (dim * t + t) + (t * t + t)
    for i, (a, b) in enumerate(pairs):
        n += 2 * res(a, a) + (full(a) if i == last else lin(a)) + (conv(1, 4 * a, b) if i < last else conv(3, a, b))
    n += 2 * res(dims[-1], dims[-1]) + full(dims[-1])
    for j, (a, b) in enumerate(reversed(pairs)):
        n += 2 * res(b + a, b) + (full(b) if j == 0 else lin(b)) + conv(3, b, a)
    return n + res(2 * dim, dim) + conv(1, dim, channels)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def test_seed_unet_has_the_peers_parameter_count():
    net = build_unet(None, role="denoiser", image_size=128, conditioner=NoCondition(role="denoiser"))
    assert n_params(net) == closed_form_params(64, [1, 2, 4, 8]) == 35_711_491  # 35.7M, the peer's count


@pytest.mark.parametrize("size,mults", [(32, [1, 2, 4, 8]), (48, [1, 2, 4]), (64, [1, 2, 2, 2]), (96, [1, 2])])
def test_shapes_at_several_sizes(size, mults):
    cfg = UnetConfig(dim=8, dim_mults=mults, attn_heads=2, attn_dim_head=8)
    net = build_unet(cfg, role="denoiser", image_size=size, conditioner=NoCondition(role="denoiser"))
    assert n_params(net) == closed_form_params(8, mults, heads=2, dim_head=8)
    x = torch.randn(2, 3, size, size)
    out = net(x, torch.tensor([0.0, 999.0]), None)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_learned_time_embedding_builds_and_differs_by_t():
    cfg = UnetConfig(dim=8, dim_mults=[1, 2], attn_heads=2, attn_dim_head=8, time_embedding="learned")
    net = build_unet(cfg, role="denoiser", image_size=32, conditioner=NoCondition(role="denoiser"))
    x = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    out = net(x, torch.tensor([1.0, 500.0]), None)
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("size", [16, 36, 512])
def test_bad_size_names_the_key(size):
    with pytest.raises(HandforgeError, match=r"data.size = .*backbone 'unet'"):
        build_unet(None, role="denoiser", image_size=size, conditioner=NoCondition(role="denoiser"))


def test_gan_role_is_refused():
    with pytest.raises(HandforgeError, match="backbone 'unet' is a denoiser"):
        build_unet(None, role="generator", image_size=32, conditioner=NoCondition(role="generator"))


def small(cond, size=32):
    cfg = UnetConfig(dim=8, dim_mults=[1, 2], attn_heads=2, attn_dim_head=8)
    return build_unet(cfg, role="denoiser", image_size=size, conditioner=cond)


def test_label_conditioning_and_null_class():
    cond = ClassBatchNorm(role="denoiser", n_classes=5)
    net = small(cond)
    with torch.no_grad():
        net.cond_embed.weight[:5].normal_()
    x, t = torch.randn(1, 3, 32, 32).expand(3, -1, -1, -1), torch.full((3,), 10.0)
    labels = torch.tensor([0, 3, 3])
    dropped = cond.drop(labels, torch.tensor([False, False, True]))
    assert dropped.tolist() == [0, 3, 5]
    out = net(x, t, dropped)
    assert not torch.allclose(out[0], out[1])  # the class changes the output
    # the null class starts at zero: the same output as an unconditional forward
    assert torch.allclose(out[2], net(x[:1], t[:1], None)[0], atol=1e-6)


def test_pose_maps_enter_the_input_and_drop_zeroes_them():
    cond = ConcatConditioner(PoseMapsConfig(maps="limbs"), role="denoiser", image_size=32)
    net = small(cond)
    assert net.init_conv.in_channels == 3 + cond.input_channels
    kp = torch.rand(2, 21, 3)
    kp[..., :2] *= 32
    kp[..., 2] = 1
    maps = cond.condition({"keypoints": kp})
    dropped = cond.drop(maps, torch.tensor([False, True]))
    assert dropped[0].equal(maps[0]) and dropped[1].abs().sum() == 0
    out = net(torch.randn(2, 3, 32, 32), torch.tensor([5.0, 5.0]), dropped)
    assert out.shape == (2, 3, 32, 32)


def test_spade_is_refused_on_the_denoiser_side():
    from handforge.plugins.conditioners.pose import SpadeConditioner
    with pytest.raises(HandforgeError, match="not as the denoiser's conditioner"):
        SpadeConditioner(role="denoiser", image_size=32)


@pytest.mark.parametrize("slot,table,message", [
    ("denoiser", {"name": "deep_conv"}, "model.denoiser: backbone 'deep_conv' serves the generator and discriminator"),
    ("conditioner", {"name": "spade"}, "model.conditioner: conditioner 'spade' serves the generator and pose_transfer roles, not the denoiser"),
])
def test_validate_rejects_gan_parts_in_diffusion(tmp_path, slot, table, message):
    raw = {"name": "r", "output_dir": str(tmp_path / "runs"), "task": {"name": "diffusion"},
           "data": {"name": "procedural_hands", "size": 32},
           "model": {"denoiser": {"name": "unet"}, "conditioner": {"name": "none"}, slot: table},
           "train": {"steps": 1}}
    (tmp_path / "r.toml").write_text(dumps(raw))
    result = run_cli("validate", tmp_path / "r.toml")
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_validate_rejects_unet_in_gan(tmp_path):
    raw = {"name": "r", "output_dir": str(tmp_path / "runs"), "task": {"name": "gan"},
           "data": {"name": "procedural_hands", "size": 32},
           "model": {"generator": {"name": "unet"}, "discriminator": {"name": "deep_conv"}}, "train": {"steps": 1}}
    (tmp_path / "r.toml").write_text(dumps(raw))
    result = run_cli("validate", tmp_path / "r.toml")
    assert result.returncode == 2 and "model.generator: backbone 'unet' serves the denoiser role" in result.stderr


def test_peer_weights_give_the_peers_output():
    peer = import_peer()
    if peer is None:
        pytest.skip("denoising-diffusion-pytorch (benchmark-only extra) is not installed")
    torch.manual_seed(0)
    theirs = peer.Unet(dim=16, dim_mults=(1, 2, 4, 8), channels=3)
    ours = build_unet(UnetConfig(dim=16), role="denoiser", image_size=32, conditioner=NoCondition(role="denoiser"))
    a, b = theirs.state_dict(), ours.state_dict()
    assert [v.shape for v in a.values()] == [v.shape for v in b.values()]
    ours.load_state_dict(dict(zip(b, a.values())))
    for p in theirs.parameters():  # move every gain off 1 so the norms are exercised
        p.data.add_(0.05 * torch.randn_like(p))
    ours.load_state_dict(dict(zip(b, theirs.state_dict().values())))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3.0, 800.0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, None), theirs(x, t), atol=2e-5, rtol=1e-4)
