"""The ``pose_transfer`` task: a reference image of an individual and a target pose -> that
individual in the target pose (pose-guided person image generation, for sign language frames).

Each sample gives ``reference`` (the individual in some pose), ``reference_keypoints``, the target
``image`` and its ``keypoints``. Slots (filled under ``[model.<slot>]``):

- ``generator``: a backbone of role ``pose_transfer`` (``pose_transfer_unet``), called as
  ``generator(reference, reference_maps, target_maps)``;
- ``g_conditioner`` (default ``spade``): makes the pose maps, for the target from ``keypoints`` and
  for the reference from ``reference_keypoints``, and is how the generator re-injects the target's
  maps into its decoder (SPADE norms, or concatenation with ``concat``);
- ``discriminator`` (default ``patch_gan``) with ``d_conditioner`` (default ``concat``): judges an
  image with the target's maps (patch logits); ``loss`` (default ``hinge``) is the adversarial loss;
- ``augment`` (optional): applied to real and generated images (and the maps) before D, as in ``gan``;
- ``perceptual`` (optional): a frozen feature network of role ``perceptual`` (``mobilenet_v2`` with
  ``pretrained = true``: torchvision's ImageNet weights, put in place once with ``handforge
  weights fetch mobilenet_v2_imagenet``) for the perceptual term.

The generator's loss is ``adv_weight * g_loss + l1_weight * L1 + perceptual_weight * P``:

- ``L1 = mean(|G - target| * (1 + hand_weight * box))``, ``box`` 1 inside the square around the
  target's visible keypoints (grown by ``hand_margin`` of its side, the box the hand metrics score)
  and 0 elsewhere: ``hand_weight > 0`` asks for the hand to be right before the rest, the remedy for
  the blurred hands that sign-language generators are known for;
- ``P``: the mean absolute difference of the feature maps of ``perceptual_layers``, averaged over
  the layers (blocks 2, 5 and 12 of MobileNetV2: 24, 32 and 96 channels at 1/4, 1/8 and 1/16 of
  the image).

One iteration is one D update and one G update inside one ``accelerator.accumulate`` block; the
fakes of the D step keep their graph for the G step. Sample grids are rows of reference | target
pose (its skeleton) | generated | target. ``generate(batch)`` re-poses ``batch["reference"]`` into
``batch["keypoints"]``: the paired metrics (``ssim``, ``psnr``, ``hand_ssim``, ...) and FID use it.
"""
from __future__ import annotations

import attrs
import torch
import torch.nn as nn
from attrs import validators as v

from handforge import hookimpl
from handforge.data import square_image_size
from handforge.errors import HandforgeError
from handforge.keypoint_math import box_masks, hand_boxes
from handforge.task import Slot

from .gan import GanTask, add_terms, split_output

FIELDS = ("reference", "reference_keypoints", "keypoints")


@attrs.define
class PoseTransferConfig:
    g_lr: float = 2e-4
    d_lr: float = 2e-4
    betas: tuple[float, float] = attrs.field(  # Adam, both networks (pix2pix's)
        default=(0.5, 0.999), converter=tuple, validator=v.deep_iterable(v.and_(v.ge(0.0), v.lt(1.0))))
    adv_weight: float = attrs.field(default=1.0, validator=v.ge(0.0), metadata={"help": "weight of the adversarial term"})
    l1_weight: float = attrs.field(default=100.0, validator=v.ge(0.0), metadata={
        "help": "weight of the L1 distance to the target (pix2pix's 100)"})
    hand_weight: float = attrs.field(default=0.0, validator=v.ge(0.0), metadata={
        "help": "extra L1 weight inside the target's hand box: pixels there count 1 + hand_weight times; 0 = off"})
    hand_margin: float = attrs.field(default=0.25, validator=[v.ge(0.0), v.le(2.0)], metadata={
        "help": "the hand box grows by this share of its side on each side of the keypoints' extent"})
    perceptual_weight: float = attrs.field(default=0.0, validator=v.ge(0.0), metadata={
        "help": "weight of the perceptual term (needs [model.perceptual]); 0 = off"})
    perceptual_layers: list[int] = attrs.field(factory=lambda: [2, 5, 12], metadata={
        "help": "blocks of the perceptual network whose feature maps are compared"})
    sample_count: int = attrs.field(default=8, validator=v.ge(1), metadata={"help": "rows of each sample grid"})


class PoseTransferTask(GanTask):
    """Reference image + target pose -> image: a U-Net generator against a PatchGAN."""

    config_cls = PoseTransferConfig

    def setup(self, run):
        self.bind(run)
        cfg, acc = self.config, run.accelerator
        size = self._image_size(run.dataset)
        self.g_cond = run.components["g_conditioner"].build(role="pose_transfer", n_classes=0, image_size=size)
        self.d_cond = run.components["d_conditioner"].build(role="discriminator", n_classes=0, image_size=size)
        G = run.components["generator"].build(role="pose_transfer", image_size=size, conditioner=self.g_cond)
        D = run.components["discriminator"].build(role="discriminator", image_size=size, n_classes=0,
                                                  conditioner=self.d_cond)
        G, D = (net.to(self.device, memory_format=torch.channels_last) for net in (G, D))
        self.loss = run.components["loss"].build()
        self.spatial = bool(getattr(self.d_cond, "spatial", False))
        self.augment = self._build_augment(run.components.get("augment"), run.components["d_conditioner"], size)
        self.perceptual = self._build_perceptual(run.components.get("perceptual"), size)
        opt_g = torch.optim.Adam(G.parameters(), lr=cfg.g_lr, betas=cfg.betas)
        opt_d = torch.optim.Adam(D.parameters(), lr=cfg.d_lr, betas=cfg.betas)
        self.G, self.D, self.opt_g, self.opt_d = acc.prepare(G, D, opt_g, opt_d)
        self.ema = None  # pix2pix-style training keeps no EMA generator
        self.seed = getattr(run.recipe, "seed", 0) or 0

    def _build_perceptual(self, component, size):
        weight = self.config.perceptual_weight
        if component is None:
            if weight > 0:
                raise HandforgeError("task.perceptual_weight > 0 needs a feature network: add [model.perceptual] "
                                     "(name = \"mobilenet_v2\", pretrained = true)")
            return None
        if weight == 0:
            raise HandforgeError("[model.perceptual] is set but task.perceptual_weight is 0: set a weight, or "
                                 "drop the section")
        net = component.build(role="perceptual", image_size=size)
        if not callable(getattr(net, "feature_maps", None)):
            raise HandforgeError(f"model.perceptual: backbone '{component.name}' has no feature_maps(x, layers)")
        return net.to(self.device).eval().requires_grad_(False)

    @staticmethod
    def _image_size(dataset) -> int:
        return square_image_size(dataset, "task 'pose_transfer'")

    # -- training -----------------------------------------------------------------------------

    def pose_maps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference maps, target maps) from the batch's keypoints."""
        missing = [f for f in FIELDS if f not in batch]
        if missing:
            raise HandforgeError(f"task 'pose_transfer' needs field(s) {missing}; the batch has {sorted(batch)}")
        reference = self.g_cond.condition({"keypoints": batch["reference_keypoints"]})
        return reference, self.g_cond.condition(batch)

    def train_step(self, batch, step):
        cfg, acc = self.config, self.accelerator
        logs = {}
        with acc.accumulate(self.G, self.D):
            batch = self._to_device(batch)
            reference_maps, target_maps = self.pose_maps(batch)
            reference = batch["reference"].contiguous(memory_format=torch.channels_last)
            fake = self.G(reference, reference_maps, target_maps)
            real = batch["image"].contiguous(memory_format=torch.channels_last)
            d_cond = self.d_cond.condition(batch)

            real_in, real_cond = self._augment(real, d_cond)
            fake_in, fake_cond = self._augment(fake.detach(), d_cond)
            real_logits, _ = split_output(self.D(real_in, real_cond))
            fake_logits, _ = split_output(self.D(fake_in, fake_cond))
            d_loss = self.loss.d_loss(real_logits, fake_logits)
            d_total = add_terms(d_loss, logs, d_penalty=self._d_penalty(real_in, fake_in, real_cond, step))
            acc.backward(d_total)
            self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
            self._observe(real_logits)

            self.D.requires_grad_(False)
            with self._d_no_sync():
                fake_in, fake_cond = self._augment(fake, d_cond)
                g_loss = self.loss.g_loss(split_output(self.D(fake_in, fake_cond))[0])
            l1 = self.l1(fake, real, batch["keypoints"])
            perceptual = self.perceptual_distance(fake, real) if self.perceptual is not None else None
            g_total = cfg.adv_weight * g_loss + cfg.l1_weight * l1
            if perceptual is not None:
                g_total = g_total + cfg.perceptual_weight * perceptual
                logs["perceptual"] = perceptual
            acc.backward(g_total)
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
            self.D.requires_grad_(True)

        logs.update(d_loss=d_loss, g_loss=g_loss, l1=l1, d_real=real_logits.mean(), d_fake=fake_logits.mean())
        logs = {name: value.detach() for name, value in logs.items()}
        log = getattr(self.augment, "log", None)
        if log is not None:
            logs.update({name: torch.as_tensor(value, dtype=torch.float32, device=self.device).reshape(())
                         for name, value in log().items()})
        return logs

    def hand_mask(self, keypoints, height: int, width: int) -> torch.Tensor:
        """(N, 1, H, W): 1 inside each target's hand box, 0 elsewhere (all 0 without a visible point)."""
        boxes, _ = hand_boxes(keypoints.float(), height, width, margin=self.config.hand_margin)
        return box_masks(boxes, height, width)

    def l1(self, fake, real, keypoints) -> torch.Tensor:
        error = (fake - real).abs()
        if self.config.hand_weight == 0:
            return error.mean()
        mask = self.hand_mask(keypoints, *fake.shape[-2:]).to(error.dtype)
        return (error * (1 + self.config.hand_weight * mask)).mean()

    def perceptual_distance(self, fake, real) -> torch.Tensor:
        layers = list(self.config.perceptual_layers)
        with torch.no_grad():
            targets = self.perceptual.feature_maps(real, layers)
        maps = self.perceptual.feature_maps(fake, layers)
        if len(maps) != len(layers):
            raise HandforgeError(f"task.perceptual_layers: {layers} asks for {len(layers)} feature maps, the "
                                 f"network gave {len(maps)} (layers out of its range?)")
        return sum((a - b).abs().mean() for a, b in zip(maps, targets)) / len(maps)

    # -- sampling -----------------------------------------------------------------------------

    @property
    def condition_fields(self) -> tuple:
        return FIELDS

    @torch.no_grad()
    def generate(self, batch, seeds=None):
        """The references of ``batch`` re-drawn in its ``keypoints``' poses (deterministic: ``seeds``
        change nothing; the generator draws no noise)."""
        batch = self._to_device(batch)
        reference_maps, target_maps = self.pose_maps(batch)
        generator = self.accelerator.unwrap_model(self.G)
        was_training = generator.training
        generator.eval()
        try:
            return generator(batch["reference"], reference_maps, target_maps).float().contiguous()
        finally:
            generator.train(was_training)

    def sample(self, batch):
        """Rows of reference | target pose (its skeleton on grey) | generated | target."""
        count = self.config.sample_count
        batch = self._to_device({k: t[:count] if torch.is_tensor(t) else t for k, t in batch.items()})
        generated = self.generate(batch)
        reference, target, keypoints = batch["reference"].float(), batch["image"].float(), batch["keypoints"].float()
        pose = torch.zeros_like(target)
        cells = torch.stack([reference, pose, generated, target], dim=1).flatten(0, 1)
        hidden = torch.zeros_like(keypoints)  # visibility 0: no skeleton drawn
        skeletons = torch.stack([hidden, keypoints, hidden, hidden], dim=1).flatten(0, 1)
        return {"image": cells, "keypoints": skeletons, "nrow": 4}

    def variations(self, individuals, others, count, *, strength, generator):
        raise NotImplementedError("task pose_transfer does not make variations: give a reference and target poses "
                                  "(the paired metrics, or generate on a dataset with references)")

    def export_modules(self):
        unwrap = self.accelerator.unwrap_model
        return {"generator": unwrap(self.G), "discriminator": unwrap(self.D)}


@hookimpl
def register_tasks(register):
    register(
        "pose_transfer", PoseTransferTask, config=PoseTransferConfig, needs=("image",) + FIELDS,
        slots=(
            Slot("generator", "backbone", default="pose_transfer_unet", summary="reference + poses -> image",
                 role="pose_transfer"),
            Slot("discriminator", "backbone", default="patch_gan", summary="patch discriminator",
                 role="discriminator"),
            Slot("g_conditioner", "conditioner", default="spade",
                 summary="pose maps, and how the target pose re-enters the generator", role="pose_transfer"),
            Slot("d_conditioner", "conditioner", default="concat", summary="how the target pose enters D",
                 role="discriminator"),
            Slot("loss", "loss", default="hinge", summary="adversarial loss"),
            Slot("augment", "augmentation", optional=True,
                 summary="applied to real and generated images (and the maps) before D"),
            Slot("perceptual", "backbone", optional=True, summary="frozen feature network of the perceptual term",
                 role="perceptual"),
        ),
    )
