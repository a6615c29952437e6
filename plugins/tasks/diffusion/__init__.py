"""The ``diffusion`` task (DDPM / DDIM / DPM-Solver++ sampling, classifier-free guidance): see
:mod:`.task` for the training program, :mod:`.schedules` for the forward process and
:mod:`.samplers` for the reverse one."""
from handforge import hookimpl
from handforge.task import Slot

from .config import DiffusionConfig
from .task import DiffusionTask


@hookimpl
def register_tasks(register):
    register(
        "diffusion", DiffusionTask, config=DiffusionConfig, needs=("image",),
        slots=(
            Slot("denoiser", "backbone", summary="the denoising network, forward(x, t, cond)",
                 role="denoiser"),
            Slot("conditioner", "conditioner", default="none", summary="how conditions enter the denoiser",
                 role="denoiser"),
        ),
    )
