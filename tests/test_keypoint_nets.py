"""Keypoint backbones: layout, heads, soft-argmax, coordinate attention, FLOP counting, errors."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from handforge.cli import main
from handforge.errors import HandforgeError
from handforge.plugins.backbones import keypoint_nets as kn

pytestmark = pytest.mark.usefixtures("one_thread")

BUILDERS = {
    "simple_cnn": (kn.build_simple_cnn, kn.SimpleCnnConfig),
    "mobilelite": (kn.build_mobilelite, kn.MobileLiteConfig),
    "mobilelite_attn": (kn.build_mobilelite_attn, kn.MobileLiteAttnConfig),
}
# The issue's mobilelite: (input channels, output channels, stride) of its seven blocks.
ISSUE_BLOCKS = [(32, 32, 1), (32, 48, 2), (48, 48, 1), (48, 64, 2), (64, 64, 1), (64, 96, 2), (96, 128, 2)]


def build(name, size, head="regression", **options):
    factory, config_cls = BUILDERS[name]
    return factory(config_cls(**options), role="keypoints", image_size=size, num_keypoints=21, head=head)


def count(module):
    return sum(p.numel() for p in module.parameters())


# -- soft-argmax ------------------------------------------------------------------------------------


def test_soft_argmax_of_a_one_hot_map_is_the_cell_centre():
    maps = torch.full((1, 2, 4, 8), -math.inf)
    maps[0, 0, 2, 5] = 0.0  # row 2 of 4, column 5 of 8
    maps[0, 1, 0, 7] = 3.0
    coords = kn.soft_argmax(maps)
    assert coords.shape == (1, 2, 2)
    assert torch.allclose(coords[0, 0], torch.tensor([5.5 / 8, 2.5 / 4]))
    assert torch.allclose(coords[0, 1], torch.tensor([7.5 / 8, 0.5 / 4]))


def test_soft_argmax_of_two_peaks_is_their_weighted_mean():
    maps = torch.full((2, 1, 5, 5), -math.inf)
    maps[0, 0, 1, 1] = math.log(0.25)
    maps[0, 0, 3, 4] = math.log(0.75)
    maps[1] = 0.0  # a flat map: the image centre
    coords = kn.soft_argmax(maps)
    expected = 0.25 * torch.tensor([1.5, 1.5]) / 5 + 0.75 * torch.tensor([4.5, 3.5]) / 5
    assert torch.allclose(coords[0, 0], expected)
    assert torch.allclose(coords[1, 0], torch.tensor([0.5, 0.5]))


def test_soft_argmax_is_differentiable_and_float32_under_half_inputs():
    maps = torch.randn(2, 3, 6, 6, requires_grad=True)
    kn.soft_argmax(maps)[..., 0].sum().backward()
    assert maps.grad.abs().sum() > 0
    assert kn.soft_argmax(maps.detach().bfloat16()).dtype == torch.float32


# -- shapes and heads -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("head", ["regression", "heatmap"])
def test_output_shapes_and_starting_point(name, size, head):
    torch.manual_seed(0)
    model = build(name, size, head).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size) * 2 - 1)
    assert out["coords"].shape == (2, 21, 2) and out["coords"].dtype == torch.float32
    if head == "heatmap":
        assert set(out) == {"coords", "heatmaps"}
        assert out["heatmaps"].shape == (2, 21, size // 8, size // 8)
        assert torch.equal(out["coords"], kn.soft_argmax(out["heatmaps"]))
    else:
        assert set(out) == {"coords"} and model.head.out.out_features == 42
    # Both heads start near the image centre, where an L1 loss on coordinates is smallest on average.
    assert (out["coords"] - 0.5).abs().max() < 0.1


def test_parameter_counts():
    counts = {name: count(build(name, 128)) for name in BUILDERS}
    assert 200_000 < counts["mobilelite"] < 400_000  # "a few hundred k"
    assert counts["mobilelite"] < counts["mobilelite_attn"] < 1.3 * counts["mobilelite"]
    assert 500_000 < counts["simple_cnn"] < 2_000_000
    # The parameter count does not depend on the image size (no size-dependent layers).
    assert count(build("mobilelite", 224)) == counts["mobilelite"]
    assert count(build("mobilelite", 128, width=0.5)) < counts["mobilelite"] / 2


def test_mobilelite_layout_is_the_issues():
    model = build("mobilelite", 128)
    stem, *blocks = model.body
    assert stem.conv.out_channels == 32 and stem.conv.stride == (2, 2) and isinstance(stem.act, nn.ReLU6)
    assert [(b.c_in, b.c_out, b.stride) for b in blocks] == ISSUE_BLOCKS
    assert [b.residual for b in blocks] == [True, False, True, False, True, False, False]
    assert all(b.expand.conv.out_channels == 4 * b.c_in and b.depthwise.conv.groups == 4 * b.c_in for b in blocks)
    sizes = []
    for b in blocks:
        b.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
    model.eval()(torch.zeros(1, 3, 128, 128))
    assert sizes == [(32, 64, 64), (48, 32, 32), (48, 32, 32), (64, 16, 16), (64, 16, 16), (96, 8, 8), (128, 4, 4)]
    hidden = model.head.hidden
    assert [type(m) for m in hidden] == [nn.Linear, nn.ReLU6, nn.Dropout]
    assert hidden[0].out_features == 256 and hidden[2].p == 0.2


def test_simple_cnn_layout():
    model = build("simple_cnn", 64, width=8)
    convs = [m for m in model.body if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 8, 16, 16, 32, 32, 64, 64]
    assert [c.stride[0] for c in convs] == [2, 2, 1, 2, 1, 2, 1, 2, 1]
    assert model.head.out.in_features == 64 and len(model.head.hidden) == 0


# -- coordinate attention ---------------------------------------------------------------------------


def coordinate_attention_reference(module, x):
    """The paper's equations written out: pool each row and each column, encode them apart (the
    BN is per element in eval mode), gate every value by its row's and its column's sigmoid."""
    conv, bn, act = module.encode
    w1 = conv.weight[:, :, 0, 0]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)

    def encode(z):  # (N, C, L) -> (N, mid, L)
        y = torch.einsum("mc,ncl->nml", w1, z)
        return act((y - bn.running_mean[:, None]) * scale[:, None] + bn.bias[:, None])

    f_h, f_w = encode(x.mean(3)), encode(x.mean(2))
    a_h = torch.sigmoid(torch.einsum("cm,nml->ncl", module.gate_h.weight[:, :, 0, 0], f_h)
                        + module.gate_h.bias[:, None])
    a_w = torch.sigmoid(torch.einsum("cm,nml->ncl", module.gate_w.weight[:, :, 0, 0], f_w)
                        + module.gate_w.bias[:, None])
    return x * a_h[:, :, :, None] * a_w[:, :, None, :]


def test_coordinate_attention_matches_the_paper():
    torch.manual_seed(0)
    module = kn.CoordinateAttention(64, reduction=8)
    bn = module.encode[1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(bn.weight)
    module.eval()
    x = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        assert torch.allclose(module(x), coordinate_attention_reference(module, x), atol=1e-5)
        # channels_last input: same numbers.
        assert torch.allclose(module(x.contiguous(memory_format=torch.channels_last)), module(x), atol=1e-6)


def test_every_mobilelite_attn_block_has_coordinate_attention_after_the_depthwise_conv():
    model = build("mobilelite_attn", 64)
    blocks = list(model.body)[1:]
    assert len(blocks) == 7 and all(isinstance(b.attention, kn.CoordinateAttention) for b in blocks)
    assert [b.attention.gate_h.out_channels for b in blocks] == [4 * c_in for c_in, _, _ in ISSUE_BLOCKS]
    assert all(isinstance(b.attention, nn.Identity) for b in list(build("mobilelite", 64).body)[1:])


def test_global_attention_starts_as_the_identity():
    torch.manual_seed(0)
    plain = build("mobilelite_attn", 64, "heatmap").eval()
    torch.manual_seed(0)
    with_attention = build("mobilelite_attn", 64, "heatmap", global_attention=True).eval()
    assert isinstance(with_attention.body[-1], kn.GlobalSelfAttention)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(plain(x)["coords"], with_attention(x)["coords"], atol=1e-6)
        with_attention.body[-1].gamma.fill_(1.0)
        assert not torch.allclose(plain(x)["coords"], with_attention(x)["coords"], atol=1e-6)


# -- channels_last and training ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["simple_cnn", "mobilelite_attn"])
def test_channels_last_gives_the_same_outputs_and_gradients(name):
    torch.manual_seed(0)
    model = build(name, 64, "heatmap")
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    target = torch.rand(3, 21, 2)
    grads = []
    for m, images in ((model, x), (model_cl, x.contiguous(memory_format=torch.channels_last))):
        loss = F.l1_loss(m(images)["coords"], target)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("head", ["regression", "heatmap"])
def test_a_few_steps_fit_a_fixed_batch(head):
    torch.manual_seed(0)
    model = build("mobilelite", 32, head)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    target = torch.rand(4, 21, 2) * 0.6 + 0.2
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.l1_loss(model(images)["coords"], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# -- FLOPs --------------------------------------------------------------------------------------------


def test_flops_of_a_tiny_net_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, 2, 1),  # 8x8 -> 4x4: 4*4*4 outputs x 3*3*3
        nn.Conv2d(4, 4, 3, 1, 1, groups=4),  # depthwise: 64 outputs x 1*3*3
        nn.ConvTranspose2d(4, 2, 4, 2, 1),  # 4x4 -> 8x8: 64 inputs x 2*4*4
        nn.Flatten(),
        nn.Linear(2 * 8 * 8, 5),  # 128 x 5
        nn.ReLU(),
    )
    macs = 64 * 27 + 64 * 9 + 64 * 32 + 128 * 5
    net.train()
    assert kn.flops_per_image(net, 8) == 2 * macs
    assert net.training  # the mode is given back


def mobilelite_macs_by_hand(size, num_keypoints=21):
    """From the issue's table alone: stem, seven expansion-4 blocks, GAP -> 256 -> K x 2."""
    side = size // 2
    macs = side * side * 32 * 3 * 9
    for c_in, c_out, stride in ISSUE_BLOCKS:
        hidden = 4 * c_in
        macs += side * side * c_in * hidden  # 1x1 expansion at the input resolution
        side //= stride
        macs += side * side * hidden * 9 + side * side * hidden * c_out  # depthwise, projection
    return macs + 128 * 256 + 256 * num_keypoints * 2


@pytest.mark.parametrize("size", [64, 224])
def test_mobilelite_flops_match_the_layout(size):
    assert kn.flops_per_image(build("mobilelite", size), size) == 2 * mobilelite_macs_by_hand(size)


def test_global_attention_flops_are_counted():
    size, tokens, c = 128, 16, 128
    plain = kn.flops_per_image(build("mobilelite_attn", size), size)
    with_attention = kn.flops_per_image(build("mobilelite_attn", size, global_attention=True), size)
    qkv, proj, matmuls = tokens * c * 3 * c, tokens * c * c, 2 * tokens * tokens * c
    assert with_attention - plain == 2 * (qkv + proj + matmuls)


# -- errors and registration ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("context, message", [
    ({"role": "classifier"}, "is a keypoint regressor (role 'keypoints'), not 'classifier'"),
    ({"image_size": 100}, "multiple of 32 (>= 32), got 100"),
    ({"image_size": 16}, "multiple of 32 (>= 32), got 16"),
    ({"image_size": "128"}, "got '128'"),
    ({"num_keypoints": 0}, "num_keypoints >= 1, got 0"),
    ({"head": "heatmaps"}, "has heads ['regression', 'heatmap'], not 'heatmaps'"),
])
def test_bad_context_is_one_clear_error(name, context, message):
    factory, _ = BUILDERS[name]
    full = {"role": "keypoints", "image_size": 64, "num_keypoints": 21, "head": "regression", **context}
    with pytest.raises(HandforgeError) as error:
        factory(None, **full)
    assert f"backbone '{name}'" in str(error.value) and message in str(error.value)


def test_registered_and_listed(host, capsys):
    registry = host.registry("backbone")
    for name, (factory, config_cls) in BUILDERS.items():
        entry = registry.get(name)
        assert entry.factory is factory and entry.config_cls is config_cls
        assert entry.info["roles"] == ("keypoints",)
    with pytest.raises(SystemExit) as exit_:
        main(["list", "backbone", "*mobilelite*"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "mobilelite_attn" in out and "mobilelite" in out
    with pytest.raises(SystemExit):
        main(["show", "backbone", "mobilelite_attn"])
    out = capsys.readouterr().out
    assert "global_attention" in out and "coordinate attention" in out
