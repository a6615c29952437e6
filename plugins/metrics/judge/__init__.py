"""The hand judge: an independent hand detector (MediaPipe Hands 0.10.21) run in its own Python
environment, as the ``handforge judge DIR`` command and the ``hand_detector`` metric.

:mod:`.environment` builds that environment once (``$HANDFORGE_JUDGE_PYTHON`` names an existing
one instead), :mod:`.worker` is the script it runs, :mod:`.detector` drives the worker through a
pipe, :mod:`.stats` turns detections into detection rates and PCK, :mod:`.command` and
:mod:`.metric` are what users call. Registered through the same hooks a third-party plugin uses.
"""
from handforge import hookimpl


@hookimpl
def register_metrics(register):
    from .metric import HandDetectorConfig, HandDetectorMetric

    register("hand_detector", HandDetectorMetric, config=HandDetectorConfig, needs=("image",))


@hookimpl
def register_commands(cli):
    from .command import cmd_judge, configure_judge

    cli.add_command("judge", "detect hands in a folder of images with MediaPipe Hands (its own environment, "
                    "built on first use); detection rate and PCK against labels.json", configure_judge, cmd_judge)
