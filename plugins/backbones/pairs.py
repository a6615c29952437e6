"""What every GAN backbone checks before it builds a network: the role asked for, and an image
size its blocks can be derived from (a power of two, doubling from 4x4)."""
import math

from handforge.errors import HandforgeError

ROLES = ("generator", "discriminator")


def check_size(name: str, image_size: int, role: str, roles=ROLES) -> int:
    """Blocks between 4x4 and the image; a HandforgeError naming the backbone for a bad role or size."""
    if role not in roles:
        where = " ([model.denoiser] of the diffusion task takes a denoiser such as 'unet')" if role == "denoiser" else ""
        raise HandforgeError(f"backbone '{name}' has roles {sorted(roles)}, not {role!r}{where}")
    if not isinstance(image_size, int) or image_size < 8 or image_size & (image_size - 1):
        raise HandforgeError(f"backbone '{name}' needs a power-of-two image size >= 8, got {image_size}")
    return int(math.log2(image_size // 4))


def pick_network(name: str, role: str, image_size: int, generator: type, discriminator: type) -> type:
    """The network class for ``role``, after the checks of :func:`check_size`."""
    check_size(name, image_size, role)
    return {"generator": generator, "discriminator": discriminator}[role]
