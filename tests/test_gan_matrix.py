"""The GAN matrix: every registered backbone with every (generator, discriminator) conditioner pair
takes one GanTask step at 32 px; every loss and every augmentation does on one backbone.

Everything is parametrized from the built-in registry, so a new backbone, conditioner, loss or
augmentation joins the matrix by registering as a built-in.
Components are built from their registry entries, as a recipe would, with tiny widths.
"""
import accelerate
import attrs
import pytest
import torch

from handforge.data import N_KEYPOINTS, check_sample
from handforge.errors import HandforgeError
from handforge.plugin_manager import PluginHost
from handforge.plugins.backbones.big_resnet import SelfAttention
from handforge.plugins.conditioners.pose import Spade
from handforge.plugins.tasks.gan import GanConfig, GanTask
from handforge.recipe import Component
from handforge.task import RunContext

SIZE, BATCH, N_CLASSES = 32, 8, 3

HOST = PluginHost()  # read at collection time: the parameters come from the registry
HOST.load_builtins()

# The backbones that are GAN generator/discriminator pairs: these must build, never be skipped.
GAN_BACKBONES = {"deep_conv", "resnet", "big_resnet", "stylegan2", "stylegan3"}
# Conditioners a backbone refuses by design, by side; it must say so with a HandforgeError naming
# itself and the conditioner. StyleGAN2/3 have no BatchNorm to make class- or pose-conditional:
# their generators take the condition through the mapping input only (none, cadain).
REJECTS = {"stylegan2": {"generator": {"cbn", "spade"}}, "stylegan3": {"generator": {"cbn", "spade"}}}

# Tiny options, applied where the component's config has the field.
TINY = {
    "backbone": {"ch": 4, "z_dim": 16, "shared_dim": 16, "w_dim": 16, "mapping_layers": 2,
                 "num_layers": 4},
    "conditioner": {"hidden": 8, "embed_dim": 16},
}


def tiny_config(kind: str, name: str, **options):
    entry = HOST.registry(kind).get(name)
    if entry.config_cls is None:
        return entry, None
    fields = attrs.fields_dict(entry.config_cls)
    return entry, entry.config_cls(**{k: v for k, v in {**TINY.get(kind, {}), **options}.items() if k in fields})


def component(kind: str, name: str, slot: str, **options) -> Component:
    entry, config = tiny_config(kind, name, **options)
    return Component(name, config, entry, f"model.{slot}")


def serves(name: str, role: str) -> bool:
    """Whether conditioner ``name`` accepts ``role`` (a conditioner refuses a side with HandforgeError)."""
    entry, config = tiny_config("conditioner", name)
    try:
        entry.factory(config, role=role, n_classes=N_CLASSES, image_size=SIZE)
    except HandforgeError:
        return False
    return True


CONDITIONERS = HOST.registry("conditioner").names()
G_SIDE = [c for c in CONDITIONERS if serves(c, "generator")]
D_SIDE = [c for c in CONDITIONERS if serves(c, "discriminator")]
# Backbones of other tasks declare their roles (a classifier's are ("classifier",)); GAN pairs
# declare none, or list "generator". A declared-other backbone is left out, not skipped 20 times.
BACKBONES = [e.name for e in HOST.registry("backbone") if "generator" in e.info.get("roles", ("generator",))]
MATRIX = [(b, g, d) for b in BACKBONES for g in G_SIDE for d in D_SIDE]


class TinyHands(torch.utils.data.Dataset):
    """Random images, labels and keypoints (inside the frame, all visible): every field a conditioner reads."""

    class_names = ["fist", "palm", "point"]
    image_size = SIZE

    def __init__(self, n=2 * BATCH):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, SIZE, SIZE, generator=generator) * 2 - 1
        self.labels = torch.arange(n) % N_CLASSES  # every class in every batch (d2dce has positives)
        xy = 0.2 + 0.6 * torch.rand(n, N_KEYPOINTS, 2, generator=generator)
        self.keypoints = torch.cat([xy, torch.ones(n, N_KEYPOINTS, 1)], dim=2)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "keypoints": self.keypoints[i]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_task(backbone="resnet", g="none", d="none", loss="hinge", augment=None, gan_config=None):
    """A set-up GanTask on CPU and its first batch (built like test_gan_components.make_run, from the registry)."""
    accelerate.state.AcceleratorState._reset_state(True)
    torch.manual_seed(0)
    dataset = TinyHands()
    components = {
        "generator": component("backbone", backbone, "generator"),
        "discriminator": component("backbone", backbone, "discriminator"),
        "g_conditioner": component("conditioner", g, "g_conditioner"),
        "d_conditioner": component("conditioner", d, "d_conditioner"),
        "loss": component("loss", loss, "loss"),
    }
    if augment is not None:
        components["augment"] = component("augmentation", augment, "augment")
    batches = iter(torch.utils.data.DataLoader(dataset, batch_size=BATCH))
    run = RunContext(recipe=None, accelerator=accelerate.Accelerator(cpu=True), run_dir=None, dataset=dataset,
                     components=components, next_batch=lambda: next(batches))
    task = GanTask(gan_config or GanConfig(sample_count=4))
    task.setup(run)
    return task, next(batches)


def zero_gated(net) -> set:
    """Weights that get no gradient in the first step by construction: SPADE's shared conv (its gamma
    and beta convs start at zero) and self-attention's convs (its output gain sigma starts at zero)."""
    gated = set()
    for module in net.modules():
        if isinstance(module, Spade):
            gated.update(module.shared.parameters())
        if isinstance(module, SelfAttention):
            gated.update(p for name, p in module.named_parameters() if name != "sigma")
    return gated


def snapshot(net):
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def assert_trained(before: dict, net, which: str):
    """Every weight matrix / kernel moved (a bias or gain can have an exactly zero first gradient),
    except the zero-gated ones; and SAGAN's sigma, which does get a gradient, moved too."""
    gated = zero_gated(net)
    params = dict(net.named_parameters())
    checked = [name for name, p in params.items()
               if (p.ndim > 1 and p not in gated) or name.endswith("attention.sigma")]
    still = [name for name in checked if torch.equal(before[name], params[name])]
    assert checked and not still, f"{which}: parameters unchanged by the step: {still}"


def step_and_check(task, batch) -> dict:
    modules = task.export_modules()
    G, D = modules["generator"], modules["discriminator"]
    g0, d0 = snapshot(G), snapshot(D)
    logs = task.train_step(batch, step=0)
    assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(logs)
    bad = {name: value for name, value in logs.items() if not (value.ndim == 0 and torch.isfinite(value))}
    assert not bad, f"non-finite or non-scalar logs: {bad}"
    assert_trained(g0, G, "generator")
    assert_trained(d0, D, "discriminator")
    return logs


# -- the registry is what the matrix is built from --------------------------------------------------


def test_matrix_covers_the_design_table():
    assert {"none", "cbn", "spade", "cadain"} <= set(G_SIDE)
    assert {"none", "projection", "concat", "acgan", "d2dce"} <= set(D_SIDE)
    assert set(G_SIDE) & set(D_SIDE) == {"none"}  # every other conditioner serves one side only
    assert {"deep_conv", "resnet", "big_resnet"} <= set(BACKBONES)
    assert {"hinge", "nonsaturating", "logistic", "wgan_gp"} <= set(HOST.registry("loss").names())
    assert {"diffaug", "ada"} <= set(HOST.registry("augmentation").names())


def test_tiny_dataset_follows_the_sample_contract():
    check_sample(TinyHands()[0], where="TinyHands sample 0")


# -- backbone x g_conditioner x d_conditioner -------------------------------------------------------


AUX_HEADS = {"acgan", "d2dce"}  # discriminator heads with an auxiliary classification objective


def expected_rejection(backbone, g, d):
    sides = REJECTS.get(backbone, {})
    return next((name for name, side in ((g, "generator"), (d, "discriminator"))
                 if name in sides.get(side, ())), None)


@pytest.mark.parametrize("backbone, g, d", MATRIX, ids=[f"{b}-{g}-{d}" for b, g, d in MATRIX])
def test_backbone_with_conditioners_takes_a_step(backbone, g, d):
    rejected = expected_rejection(backbone, g, d)
    if rejected:
        with pytest.raises(HandforgeError) as error:
            make_task(backbone, g, d)
        assert backbone in str(error.value) and rejected in str(error.value), str(error.value)
        return
    try:
        task, batch = make_task(backbone, g, d)
    except HandforgeError as error:
        if backbone in GAN_BACKBONES:
            raise
        if "role" in str(error):  # a registered backbone of another task (a U-Net, a classifier)
            pytest.skip(f"backbone '{backbone}' is no GAN generator/discriminator: {error}")
        raise
    logs = step_and_check(task, batch)
    if d in AUX_HEADS:  # the auxiliary objective joins both losses
        assert {"d_aux", "g_aux"} <= set(logs)
    elif d in {"none", "projection", "concat"}:
        assert not {"d_aux", "g_aux"} & set(logs)


# -- losses and augmentations, on one backbone ------------------------------------------------------

# Whether the loss's default config adds a penalty on D step 0 (lazy R1 runs on steps 0, 16, ...).
PENALTY_AT_STEP_0 = {"hinge": False, "nonsaturating": False, "logistic": True, "wgan_gp": True}
LOSSES = HOST.registry("loss").names()


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_takes_a_step(loss):
    task, batch = make_task("resnet", "cbn", "projection", loss=loss)
    logs = step_and_check(task, batch)
    if loss in PENALTY_AT_STEP_0:
        assert ("d_penalty" in logs) == PENALTY_AT_STEP_0[loss]
    if "d_penalty" in logs:
        assert logs["d_penalty"] >= 0
    if loss == "wgan_gp":  # the critic's loss is E[D(fake)] - E[D(real)] (no drift by default)
        torch.testing.assert_close(logs["d_loss"], logs["d_fake"] - logs["d_real"])
    if loss == "hinge":
        assert logs["d_loss"] >= 0


# The discriminator-side ones; data-side augmentations (signature "batch") belong to other tasks.
AUGMENTATIONS = [name for name in HOST.registry("augmentation").names()
                 if HOST.registry("augmentation").get(name).info.get("signature") != "batch"]


def test_a_data_side_augmentation_is_refused_by_name():
    with pytest.raises(HandforgeError, match="augmentation 'keypoint_affine' transforms data batches"):
        make_task("resnet", "spade", "concat", augment="keypoint_affine")


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_augmentation_takes_a_step_and_moves_the_maps(augment):
    """With pose maps on D's side, D sees augmented images and maps moved with them."""
    task, batch = make_task("resnet", "spade", "concat", augment=augment)
    if hasattr(task.augment, "set_p"):  # ADA starts at p = 0 (no augmentation): force it on
        task.augment.set_p(0.5)
    seen = []
    D = task.export_modules()["discriminator"]
    hook = D.register_forward_pre_hook(lambda module, args: seen.append([a.detach().clone() for a in args]))
    try:
        logs = step_and_check(task, batch)
    finally:
        hook.remove()
    real_in, real_maps = seen[0]  # the first D call of the step is on the real batch
    maps = task.d_cond.condition(batch)
    assert real_in.shape == batch["image"].shape and real_maps.shape == maps.shape
    assert not torch.allclose(real_in, batch["image"])
    assert not torch.allclose(real_maps, maps)  # geometric transforms moved the maps too
    if hasattr(task.augment, "set_p"):
        assert logs["ada_p"] == pytest.approx(0.5)  # one observe() call: p is not updated before `interval`
