"""The unet denoiser: parameter count by closed form, shapes at several sizes, the size/role errors,
the conditioners' denoiser side (class embedding, pose maps, SPADE modulation, drop for guidance),
and, when the benchmark-only extra denoising-diffusion-pytorch is installed, the peer's weights
giving the peer's output."""
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_cli
from handforge.errors import HandforgeError
from handforge.plugins.backbones.unet import Block, UnetConfig, build_unet
from handforge.plugins.conditioners.auxiliary import LatentLabel
from handforge.plugins.conditioners.label import ClassBatchNorm, NoCondition
from handforge.plugins.conditioners.pose import (ConcatConditioner, PoseMapsConfig, PoseModulation,
                                                 SpadeConditioner, SpadeConfig)
from handforge.plugins.tasks.diffusion.guidance import predictor
from handforge.plugins.tasks.diffusion.schedules import Schedule, to_x0_eps
from handforge.recipe import load_recipe
from handforge.toml_writer import dumps

from peer_ddpm import import_peer

pytestmark = pytest.mark.usefixtures("one_thread")


def closed_form_params(dim, mults, channels=3, heads=4, dim_head=32, mem=4, in_extra=0, spade=None):
    """The peer's Unet layout counted by hand: conv = k*k*cin*cout + cout, rms gain = c. ``spade``
    (map channels, hidden, kernel): a SPADE modulation after each of a residual block's 2 norms."""
    conv = lambda k, a, b, bias=True: k * k * a * b + (b if bias else 0)  # noqa: E731
    t = 4 * dim
    mod = (lambda c: 0) if spade is None else (  # noqa: E731
        lambda c: conv(spade[2], spade[0], spade[1]) + 2 * conv(spade[2], spade[1], c))
    res = lambda a, b: ((t * 2 * b + 2 * b) + conv(3, a, b) + b + conv(3, b, b) + b  # noqa: E731
                        + (conv(1, a, b) if a != b else 0) + 2 * mod(b))
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


def test_a_generator_only_conditioner_is_refused_on_the_denoiser_side():
    with pytest.raises(HandforgeError, match="not as the denoiser's conditioner"):
        LatentLabel(role="denoiser", n_classes=3, image_size=32)


# -- SPADE modulation on the denoiser (conditioner spade) ------------------------------------------

def spade(maps="limbs", hidden=6, kernel=3, size=32):
    return SpadeConditioner(SpadeConfig(maps=maps, hidden=hidden, kernel=kernel), role="denoiser", image_size=size)


def visible_keypoints(n, seed=0):
    keypoints = torch.rand(n, 21, 3, generator=torch.Generator().manual_seed(seed))
    keypoints[..., :2] = keypoints[..., :2] * 0.6 + 0.2
    keypoints[..., 2] = 1
    return keypoints


def perturb_modulation(net, seed=0):
    """Random weights in every modulation layer (zero at initialisation), the rest untouched."""
    generator = torch.Generator().manual_seed(seed)
    layers = [m for m in net.modules() if isinstance(m, PoseModulation)]
    assert layers
    with torch.no_grad():
        for p in (p for layer in layers for p in layer.parameters()):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return net


def test_spade_unet_has_a_modulation_after_every_residual_norm_by_closed_form():
    cond = spade(maps="both", hidden=5, kernel=3)
    net = small(cond)
    assert net.init_conv.in_channels == 3 and cond.input_channels == 0  # the maps do not enter x_t
    assert n_params(net) == closed_form_params(8, [1, 2], heads=2, dim_head=8, spade=(41, 5, 3))
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    assert all(isinstance(b.modulation, PoseModulation) for b in blocks)
    assert len(blocks) == 2 * (2 * 2 + 2 + 2 * 2 + 1)  # 2 per residual block: down, middle, up, final
    # A conditioner without the hook (or returning None) adds nothing: no module, no key.
    for plain in (small(NoCondition(role="denoiser")), small(ConcatConditioner(role="denoiser", image_size=32))):
        assert all(b.modulation is None for b in plain.modules() if isinstance(b, Block))
        assert not any("modulation" in k for k in plain.state_dict())


def test_zero_initialised_spade_unet_is_exactly_the_unmodulated_unet():
    torch.manual_seed(0)
    plain, cond = small(NoCondition(role="denoiser")), spade()
    net = small(cond)
    result = net.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert all(".modulation." in k for k in result.missing_keys)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([2.0, 400.0, 990.0])
    maps = cond.condition({"keypoints": visible_keypoints(3)})
    with torch.no_grad():
        assert torch.equal(net(x, t, maps), plain(x, t, None))
    # Training can leave the identity: every gamma and beta gets a gradient in the first step.
    net(x, t, maps).square().mean().backward()
    layers = [m for m in net.modules() if isinstance(m, PoseModulation)]
    assert all(conv.weight.grad.abs().sum() > 0 for layer in layers for conv in (layer.gamma, layer.beta))
    with torch.no_grad():
        assert not torch.equal(perturb_modulation(net)(x, t, maps), plain(x, t, None))


def test_the_modulation_acts_between_the_norm_and_the_time_scale_and_shift():
    torch.manual_seed(1)
    cond = spade(hidden=4, kernel=1)
    block = Block(5, 6, modulation=cond.denoiser_modulation(6))
    perturb_modulation(block)
    x, maps = torch.randn(2, 5, 16, 16), cond.condition({"keypoints": visible_keypoints(2)})
    scale, shift = torch.randn(2, 6, 1, 1), torch.randn(2, 6, 1, 1)
    m = F.interpolate(maps, size=(16, 16), mode="bilinear", antialias=True)  # 32 px maps at 16 px
    mod = block.modulation
    hidden = torch.relu(torch.einsum("nkhw,ck->nchw", m, mod.shared.weight[:, :, 0, 0])
                        + mod.shared.bias[:, None, None])
    gamma = torch.einsum("nkhw,ck->nchw", hidden, mod.gamma.weight[:, :, 0, 0]) + mod.gamma.bias[:, None, None]
    beta = torch.einsum("nkhw,ck->nchw", hidden, mod.beta.weight[:, :, 0, 0]) + mod.beta.bias[:, None, None]
    h = block.proj(x)
    h = h / h.norm(dim=1, keepdim=True) * block.norm.g * 6 ** 0.5  # RMS norm over channels
    expected = F.silu((h * (1 + gamma) + beta) * (scale + 1) + shift)
    assert gamma.abs().mean() > 0.1 and beta.abs().mean() > 0.1
    torch.testing.assert_close(block(x, (scale, shift), maps), expected, rtol=1e-4, atol=1e-5)


def test_spade_unet_output_depends_on_each_rows_keypoints_and_nothing_else():
    torch.manual_seed(2)
    cond = spade(maps="heatmaps")
    net = perturb_modulation(small(cond)).eval()
    x, t = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1), torch.full((4,), 300.0)
    keypoints = visible_keypoints(4)
    moved = keypoints.clone()
    moved[2, :, :2] = 1 - moved[2, :, :2]  # row 2 takes another pose
    with torch.no_grad():
        a, b = net(x, t, cond.condition({"keypoints": keypoints})), net(x, t, cond.condition({"keypoints": moved}))
        torch.testing.assert_close(a[[0, 1, 3]], b[[0, 1, 3]], rtol=0, atol=1e-6)
        assert (a[2] - b[2]).abs().max() > 1e-2
        assert (a[0] - a[1]).abs().max() > 1e-2  # one x_t, two poses: two outputs
        # The null pose carries no keypoints: any two poses dropped give one output.
        all_rows = torch.ones(4, dtype=torch.bool)
        null_a = net(x, t, cond.drop(cond.condition({"keypoints": keypoints}), all_rows))
        null_b = net(x, t, cond.drop(cond.condition({"keypoints": moved}), all_rows))
        assert torch.equal(null_a, null_b)
        torch.testing.assert_close(null_a[0], null_a[3], rtol=0, atol=1e-6)


def test_spade_drop_is_the_null_pose_and_guidance_at_scale_1_is_the_conditional_prediction():
    torch.manual_seed(3)
    cond = spade()
    net = perturb_modulation(small(cond)).eval()
    maps = cond.condition({"keypoints": visible_keypoints(2)})
    dropped = cond.drop(maps, torch.tensor([False, True]))
    assert dropped[0].equal(maps[0]) and maps[1].abs().sum() > 0 and dropped[1].abs().sum() == 0
    schedule, x, t = Schedule("cosine", 1000), torch.randn(2, 3, 32, 32), torch.tensor([100.0, 700.0])
    a, s = schedule.coefficients(t, x)
    with torch.no_grad():
        c, u = net(x, t, maps), net(x, t, torch.zeros_like(maps))
        assert (c - u).abs().max() > 1e-2
        for scale, expected in [(1.0, c), (2.0, 2 * c - u)]:
            predict = predictor(net, schedule, "pred_v", maps, conditioner=cond, guidance_scale=scale, clip=False)
            x0, eps = to_x0_eps("pred_v", x, expected, a, s)
            got = predict(x, t)
            torch.testing.assert_close(got[0], x0, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[1], eps, rtol=1e-4, atol=1e-5)


def test_validate_accepts_the_quickstart_with_spade(host):
    recipe = load_recipe(REPO / "recipes" / "diffusion_quickstart.toml", ["model.conditioner.name=spade"], host=host)
    assert (recipe.model["denoiser"].name, recipe.model["conditioner"].name) == ("unet", "spade")
    assert recipe.model["conditioner"].config == SpadeConfig(maps="limbs")


@pytest.mark.parametrize("slot,table,message", [
    ("denoiser", {"name": "deep_conv"}, "model.denoiser: backbone 'deep_conv' serves the generator and discriminator"),
    ("conditioner", {"name": "cadain"},
     "model.conditioner: conditioner 'cadain' serves the generator role, not the denoiser"),
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


def reference_linear_attention(attn, x):
    """Shen et al.'s linear attention written out on (heads, d, positions) planes, as the peer does:
    memory keys and values concatenated, q softmaxed over features, k over positions."""
    n, c, h, w = x.shape
    heads = attn.heads
    qkv = F.conv2d(attn.norm(x), attn.to_qkv.weight).reshape(n, 3, heads, -1, h * w)
    q, k, v = qkv.unbind(1)
    mk, mv = (m.expand(n, -1, -1, -1) for m in attn.mem_kv)
    k, v = torch.cat([mk, k], dim=-1), torch.cat([mv, v], dim=-1)
    q = q.softmax(dim=-2) * attn.scale
    context = torch.einsum("nhdp,nhep->nhde", k.softmax(dim=-1), v)
    out = torch.einsum("nhde,nhdp->nhep", context, q).reshape(n, -1, h, w)
    return attn.to_out(out.contiguous())


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_linear_attention_matches_the_written_out_formula(memory_format):
    from handforge.plugins.backbones.unet import LinearAttention

    torch.manual_seed(0)
    attn = LinearAttention(24, heads=3, dim_head=8, mem_kv=4)
    with torch.no_grad():
        attn.to_out[0].bias.normal_()
        attn.to_out[1].g.uniform_(0.5, 1.5)
        attn.mem_kv.mul_(3)  # large memory keys: the shared maximum must span them
    x = (torch.randn(3, 24, 6, 5) * 4).contiguous(memory_format=memory_format).requires_grad_()
    ours, expected = attn(x), reference_linear_attention(attn, x)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    probe = torch.randn_like(expected)
    grads = torch.autograd.grad((ours * probe).sum(), [x, *attn.parameters()])
    expected_grads = torch.autograd.grad((expected * probe).sum(), [x, *attn.parameters()])
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
