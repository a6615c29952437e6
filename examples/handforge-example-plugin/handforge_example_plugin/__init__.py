"""Example third-party handforge plugin: the ``random_grayscale`` augmentation and the
``color_moments`` metric, found by handforge through the "handforge" entry point group."""
import attrs
import torch

from handforge import hookimpl
from handforge.data import first_samples
from handforge.recipe import at_least

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights


@attrs.define
class GrayscaleConfig:
    p: float = attrs.field(default=0.2, metadata={"help": "probability that an image turns grey"})


class RandomGrayscale(torch.nn.Module):
    """With probability p per image, replace its RGB channels by their luminance."""

    def __init__(self, config: GrayscaleConfig, **_):
        super().__init__()
        self.p = config.p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb, rest = x[:, :3], x[:, 3:]
        weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        gray = (rgb * weights).sum(1, keepdim=True).expand_as(rgb)
        chosen = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.p).to(x.dtype)
        return torch.cat([torch.lerp(rgb, gray, chosen), rest], dim=1)


@attrs.define
class ColorMomentsConfig:
    num_samples: int = attrs.field(default=64, validator=at_least(1),
                                   metadata={"help": "real samples (and as many generated) compared"})


class ColorMoments:
    """L2 distance between per-channel (mean, std) of real and generated images."""

    def __init__(self, config: ColorMomentsConfig, **_):
        self.config = config

    @staticmethod
    def moments(images: torch.Tensor) -> torch.Tensor:
        flat = images.float().transpose(0, 1).reshape(3, -1)
        return torch.cat([flat.mean(1), flat.std(1)])

    @torch.no_grad()
    def evaluate(self, run) -> dict:
        # A fixed set of real samples, read from the dataset directly so the training stream
        # (and so a resumed run) is untouched.
        batch = {k: v.to(run.device) for k, v in first_samples(run.dataset, self.config.num_samples).items()}
        fake = run.task.generate(batch)
        distance = torch.linalg.vector_norm(self.moments(batch["image"]) - self.moments(fake))
        return {"color_moments": distance.item()}


@hookimpl
def register_augmentations(register):
    register("random_grayscale", RandomGrayscale, config=GrayscaleConfig)


@hookimpl
def register_metrics(register):
    register("color_moments", ColorMoments, config=ColorMomentsConfig, needs=("image",))
