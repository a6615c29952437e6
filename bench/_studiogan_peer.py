"""The real peer of bench/gan_step.py: PyTorch-StudioGAN's own big_resnet and training iteration,
imported at run time from a checkout (``--studiogan-src PATH``). No StudioGAN code lives here.

``load(path)``
    Puts the checkout's ``src/`` first on ``sys.path`` and imports StudioGAN's ``config``,
    ``models.big_resnet``, ``utils.{misc,sample,losses,ema}``. Packages those modules import but the
    big_resnet iteration never uses (torchvision, seaborn, matplotlib, kornia, ...) get empty
    stand-in modules in ``sys.modules`` when, and only when, they are not installed; so does
    ``pkg_resources`` (its ``parse_version`` is ``packaging.version.parse``). Importing StudioGAN
    adds no other side effect; its modules stay in ``sys.modules`` for the rest of the process.

``StudioGan(path, batch_size, n_classes, overrides)``
    StudioGAN's ``Configurations`` read from its own 64 px BigGAN config
    (``src/configs/Baby_ImageNet/BigGAN.yaml``: big_resnet, cBN in G, "PD" projection in D,
    spectral norm on both, attention after G block 3 / D block 1 (32 px), hinge, Adam
    (0, 0.999), eps 1e-6, 1 D step per G step, EMA G), with ``overrides`` (channel width,
    z_dim, classes, batch) applied through StudioGAN's own ``update_cfgs``; the models are built
    with the arguments ``models/model.py`` passes, on CPU, and the optimizers by
    ``Configurations.define_optimizer``. The EMA generator is StudioGAN's ``utils.ema.Ema``.

    ``step(batch, iteration)`` is one iteration as ``worker.WORKER.train_discriminator`` then
    ``train_generator`` run it for this config (no augmentation, no regulariser, no mixed
    precision, 1 accumulation step, no DDP): ``make_GAN_trainable``, ``toggle_grad`` (G frozen
    for the D step, D for the G step), G's BatchNorm statistics untracked in the D step,
    fakes and labels from ``sample.generate_images`` (fresh z and "totally_random" labels, once
    for the D step and again for the G step), ``LOSS.d_loss`` / ``LOSS.g_loss`` (d_hinge /
    g_hinge), backward, Adam step, then ``Ema.update``. NCHW throughout, torch's
    ``spectral_norm`` (one power iteration per forward), as StudioGAN has it.
"""
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import contextlib
import copy
import sys
import types

import torch

CONFIG = os.path.join("configs", "Baby_ImageNet", "BigGAN.yaml")  # StudioGAN's 64 px BigGAN config
# Imported by StudioGAN modules on the path to big_resnet / config.py, unused by its iteration:
UNUSED_IMPORTS = ("torchvision", "seaborn", "matplotlib", "kornia")


class _Stub(types.ModuleType):
    """An empty stand-in module: any attribute is a placeholder class, any submodule another stub."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *a, **k: None, "__module__": self.__name__})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Stub(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install_shims():
    """Stubs for the UNUSED_IMPORTS that are not installed, ``pkg_resources.parse_version``: the stubbed names."""
    missing = [name for name in UNUSED_IMPORTS if name not in sys.modules and importlib.util.find_spec(name) is None]
    if missing and not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.append(_StubFinder(missing))  # last: only reached when nothing real is found
    stubbed = list(missing)
    if importlib.util.find_spec("pkg_resources") is None and "pkg_resources" not in sys.modules:
        import packaging.version
        shim = types.ModuleType("pkg_resources")
        shim.parse_version = packaging.version.parse
        sys.modules["pkg_resources"] = shim
        stubbed.append("pkg_resources (parse_version = packaging.version.parse)")
    return stubbed


def source_dir(path):
    """The ``src`` folder of a StudioGAN checkout given as the checkout or as its ``src``."""
    for candidate in (os.path.join(path, "src"), path):
        if os.path.isfile(os.path.join(candidate, "models", "big_resnet.py")) and \
                os.path.isfile(os.path.join(candidate, "config.py")):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f"{path}: not a PyTorch-StudioGAN checkout (no src/models/big_resnet.py, src/config.py)")


def load(path):
    """StudioGAN's modules from the checkout at ``path``: a namespace of them, plus ``src`` and ``stubbed``."""
    src = source_dir(path)
    stubbed = install_shims()
    if src not in sys.path:
        sys.path.insert(0, src)
    names = {"config": "config", "big_resnet": "models.big_resnet", "misc": "utils.misc", "sample": "utils.sample",
             "losses": "utils.losses", "ema": "utils.ema"}
    found = {}
    for key, name in names.items():
        module = importlib.import_module(name)
        where = os.path.abspath(getattr(module, "__file__", "") or "")
        if not where.startswith(src + os.sep):  # another package of that name shadows StudioGAN's
            raise ImportError(f"'{name}' imports from {where}, not from the StudioGAN checkout {src}")
        found[key] = module
    return types.SimpleNamespace(src=src, stubbed=stubbed, **found)


class StudioGan:
    """StudioGAN's big_resnet G, D, EMA G, optimizers and iteration (see the module doc)."""

    def __init__(self, path, batch_size, n_classes, overrides, seed=0):
        sg = self.sg = load(path)
        cfgs = self.cfgs = sg.config.Configurations(os.path.join(sg.src, CONFIG))
        cfgs.update_cfgs({"num_classes": n_classes}, "DATA")
        cfgs.update_cfgs(dict(overrides), "MODEL")
        cfgs.update_cfgs({"batch_size": batch_size}, "OPTIMIZATION")
        cfgs.update_cfgs({"mixed_precision": False, "freezeD": -1}, "RUN")  # main.py's defaults
        cfgs.define_losses()
        MODULES = cfgs.define_modules()
        DATA, MODEL, RUN = cfgs.DATA, cfgs.MODEL, cfgs.RUN
        assert MODEL.backbone == "big_resnet" and DATA.img_size == 64, (MODEL.backbone, DATA.img_size)
        torch.manual_seed(seed)
        self.G = sg.big_resnet.Generator(  # the arguments models/model.py passes
            z_dim=MODEL.z_dim, g_shared_dim=MODEL.g_shared_dim, img_size=DATA.img_size, g_conv_dim=MODEL.g_conv_dim,
            apply_attn=MODEL.apply_attn, attn_g_loc=MODEL.attn_g_loc, g_cond_mtd=MODEL.g_cond_mtd,
            num_classes=DATA.num_classes, g_init=MODEL.g_init, g_depth=MODEL.g_depth,
            mixed_precision=RUN.mixed_precision, MODULES=MODULES, MODEL=MODEL)
        self.D = sg.big_resnet.Discriminator(
            img_size=DATA.img_size, d_conv_dim=MODEL.d_conv_dim, apply_d_sn=MODEL.apply_d_sn,
            apply_attn=MODEL.apply_attn, attn_d_loc=MODEL.attn_d_loc, d_cond_mtd=MODEL.d_cond_mtd,
            aux_cls_type=MODEL.aux_cls_type, d_embed_dim=MODEL.d_embed_dim, normalize_d_embed=MODEL.normalize_d_embed,
            num_classes=DATA.num_classes, d_init=MODEL.d_init, d_depth=MODEL.d_depth,
            mixed_precision=RUN.mixed_precision, MODULES=MODULES, MODEL=MODEL)
        self.G_ema, self.ema = None, None
        if MODEL.apply_g_ema:
            self.G_ema = copy.deepcopy(self.G)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # Ema prints a line on construction
                self.ema = sg.ema.Ema(source=self.G, target=self.G_ema, decay=MODEL.g_ema_decay,
                                      start_iter=MODEL.g_ema_start)
        cfgs.define_optimizer(self.G, self.D)
        self.opt_g, self.opt_d = cfgs.OPTIMIZATION.g_optimizer, cfgs.OPTIMIZATION.d_optimizer

    def settings(self):
        m, o = self.cfgs.MODEL, self.cfgs.OPTIMIZATION
        return {"config": CONFIG, "backbone": m.backbone, "g_cond_mtd": m.g_cond_mtd, "d_cond_mtd": m.d_cond_mtd,
                "g_conv_dim": m.g_conv_dim, "d_conv_dim": m.d_conv_dim, "z_dim": m.z_dim,
                "g_shared_dim": m.g_shared_dim, "attn_g_loc": m.attn_g_loc, "attn_d_loc": m.attn_d_loc,
                "apply_g_sn": m.apply_g_sn, "apply_d_sn": m.apply_d_sn, "adv_loss": self.cfgs.LOSS.adv_loss,
                "optimizer": o.type_, "betas": (o.beta1, o.beta2), "d_updates_per_step": o.d_updates_per_step,
                "apply_g_ema": m.apply_g_ema, "num_classes": self.cfgs.DATA.num_classes}

    def _fakes(self):
        c = self.cfgs
        fake, labels, *_ = self.sg.sample.generate_images(
            z_prior=c.MODEL.z_prior, truncation_factor=-1.0, batch_size=c.OPTIMIZATION.batch_size,
            z_dim=c.MODEL.z_dim, num_classes=c.DATA.num_classes, y_sampler="totally_random", radius=c.LOSS.radius,
            generator=self.G, discriminator=self.D, is_train=True, LOSS=c.LOSS, RUN=c.RUN, MODEL=c.MODEL,
            device="cpu", generator_mapping=None, generator_synthesis=None, is_stylegan=False,
            style_mixing_p=c.STYLEGAN.style_mixing_p, stylegan_update_emas=False, cal_trsp_cost=False)
        return fake, labels

    def step(self, batch, iteration):
        misc, c = self.sg.misc, self.cfgs
        real, real_labels = batch["image"], batch["label"]
        # train_discriminator
        misc.make_GAN_trainable(self.G, self.G_ema, self.D)
        misc.toggle_grad(model=self.G, grad=False, num_freeze_layers=-1, is_stylegan=False)
        misc.toggle_grad(model=self.D, grad=True, num_freeze_layers=c.RUN.freezeD, is_stylegan=False)
        self.G.apply(misc.untrack_bn_statistics)
        self.opt_d.zero_grad()
        fake, fake_labels = self._fakes()
        real_dict = self.D(real, real_labels)
        fake_dict = self.D(fake, fake_labels, adc_fake=False)
        d_loss = c.LOSS.d_loss(real_dict["adv_output"], fake_dict["adv_output"], DDP=False)
        (d_loss / c.OPTIMIZATION.acml_steps).backward()
        self.opt_d.step()
        # train_generator
        misc.make_GAN_trainable(self.G, self.G_ema, self.D)
        misc.toggle_grad(model=self.D, grad=False, num_freeze_layers=-1, is_stylegan=False)
        misc.toggle_grad(model=self.G, grad=True, num_freeze_layers=-1, is_stylegan=False)
        self.G.apply(misc.track_bn_statistics)
        self.opt_g.zero_grad()
        fake, fake_labels = self._fakes()
        fake_dict_g = self.D(fake, fake_labels)
        g_loss = c.LOSS.g_loss(fake_dict_g["adv_output"], DDP=False)
        (g_loss / c.OPTIMIZATION.acml_steps).backward()
        self.opt_g.step()
        if self.ema is not None:
            self.ema.update(iteration)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
                "d_real": real_dict["adv_output"].detach().mean(), "d_fake": fake_dict["adv_output"].detach().mean()}

