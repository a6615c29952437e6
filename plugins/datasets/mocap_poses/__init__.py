"""Readers of motion-capture hand poses: one module per source format (issue 16).

Each reader maps one sequence file to a :class:`~.common.HandSequence`: per-frame left and right
(N, 45) float32 axis-angle poses, 15 joints in MANO order (the ``hand_pose`` convention), plus
the source format, the frame rate and the ``flat_hand_mean`` convention the poses are stored in.
Pickled files (GRAB, ARCTIC) are read only through :mod:`handforge.safe_pickle`.
"""
from .common import HandSequence, read_sequence

__all__ = ["HandSequence", "read_sequence"]

from handforge import hookimpl


@hookimpl
def register_commands(cli):
    from . import prepare
    cli.add_preparer("mocap", "mocap sequences (AMASS, Motion-X, GRAB, ARCTIC) -> hand_poses arrays",
                     prepare.configure, prepare.command)
