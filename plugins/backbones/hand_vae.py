"""``hand_vae``: a VPoser-style variational auto-encoder of hand poses (Pavlakos et al. 2019).

Built with ``role="pose_prior"`` and ``joints`` (15 for one hand, 30 for two). The encoder is an
MLP from the flattened axis-angle pose (joints x 3) to the mean and log-variance of a Gaussian
latent; the decoder is an MLP from the latent to a continuous 6-D rotation per joint (Zhou et al.
2019), turned into rotation matrices by Gram-Schmidt (:func:`handforge.rotations.rot6d_to_matrix`),
so any output is a valid rotation and the map has no discontinuity (axis-angle outputs have one).

The input is standardized by ``mean`` / ``std`` buffers that the task fills from the training
poses (``set_statistics``), where VPoser puts a BatchNorm: buffers fixed before training keep the
encoder the same function in train and eval mode and under EMA averaging.
"""
from __future__ import annotations

import attrs
import torch
import torch.nn as nn
from attrs import validators as v

from handforge import hookimpl
from handforge.errors import HandforgeError
from handforge.rotations import matrix_to_axis_angle, rot6d_to_matrix


@attrs.define
class HandVaeConfig:
    latent_dim: int = attrs.field(default=32, validator=v.ge(1), metadata={"help": "size of the Gaussian latent"})
    hidden: int = attrs.field(default=512, validator=v.ge(8), metadata={"help": "width of the hidden layers"})
    dropout: float = attrs.field(default=0.1, validator=[v.ge(0.0), v.lt(1.0)], metadata={
        "help": "dropout after each hidden layer of the encoder and decoder (VPoser's regulariser)"})


def _mlp(sizes, dropout):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.LeakyReLU(0.2), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class HandVae(nn.Module):
    """VPoser-style VAE: axis-angle pose -> Gaussian latent -> 6-D rotation per joint."""

    roles = ("pose_prior",)

    def __init__(self, config: HandVaeConfig | None = None, *, role: str = "pose_prior", joints: int = 15,
                 **_context):
        super().__init__()
        config = config or HandVaeConfig()
        if role != "pose_prior":
            raise HandforgeError(f"backbone 'hand_vae' serves role \"pose_prior\" only, not {role!r}")
        self.joints, self.latent_dim = int(joints), config.latent_dim
        width = self.joints * 3
        self.encoder = _mlp([width, config.hidden, config.hidden, 2 * config.latent_dim], config.dropout)
        self.decoder = _mlp([config.latent_dim, config.hidden, config.hidden, self.joints * 6], config.dropout)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def encode(self, pose: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, joints*3) axis-angle -> mean and log-variance (B, latent_dim) of q(z | pose)."""
        mu, logvar = self.encoder((pose - self.mean) / self.std).chunk(2, dim=-1)
        return mu, logvar.clamp(-20.0, 10.0)  # keeps exp() finite for a wild input

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, joints, 3, 3) rotation matrices."""
        return rot6d_to_matrix(self.decoder(z).view(len(z), self.joints, 6))

    def decode_pose(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, joints*3) axis-angle."""
        return matrix_to_axis_angle(self.decode(z)).reshape(len(z), -1)

    def forward(self, pose: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """Encode, draw z by the reparameterisation trick, decode: ``mu``, ``logvar``, ``rotations``."""
        mu, logvar = self.encode(pose)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + eps * (0.5 * logvar).exp()
        return {"mu": mu, "logvar": logvar, "rotations": self.decode(z)}


@hookimpl
def register_backbones(register):
    register("hand_vae", HandVae, config=HandVaeConfig, roles=("pose_prior",))
