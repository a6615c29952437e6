"""The hooks a handforge plugin can implement (pluggy project name "handforge").

Registration hooks receive a ``register`` callable and call it once per component::

    @hookimpl
    def register_datasets(register):
        register("my_hands", MyHands, config=MyHandsConfig, provides=("image", "label"))

``register(name, factory, *, config=None, summary=None, needs=(), provides=(), **info)``:

- ``factory(config, **context)`` builds the component; ``config`` is an instance of the attrs
  class ``config`` (the recipe table's options, validated) or None when it takes no options.
- ``needs`` / ``provides``: sample fields (see :mod:`handforge.data`), as a tuple or as a
  function of the config returning one; checked by ``handforge validate``.
- ``summary``: one line for ``handforge list``; defaults to the factory docstring's first line.
- ``info``: kind-specific metadata, e.g. ``slots`` for a task, and ``check_slots(config,
  filled) -> list[str]`` for a task whose options require optional slots (problems are reported
  by ``handforge validate`` with the recipe's others).

What each kind's factory must build is :mod:`handforge.contracts` (one Protocol per kind):
``register`` refuses a class that lacks a method of it, and building checks the result. The
guide with an example of every kind is ``docs/plugins.md``.

Observer hooks are called on every process; ``run.is_main_process`` tells the main one.
"""
import pluggy

PROJECT = "handforge"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backbones(register):
    """Register network families: generator/discriminator pairs, U-Nets, regressors, classifiers."""


@hookspec
def register_conditioners(register):
    """Register ways a condition (label, keypoints) enters a network."""


@hookspec
def register_augmentations(register):
    """Register data-side or differentiable augmentations. A discriminator-side one is called as
    ``augment(images[, maps])`` (:class:`handforge.contracts.ImageAugmentation`); a data-side one
    registers ``signature="batch"`` and is called as ``augment(batch) -> batch`` (e.g. moving
    keypoints with the image; :class:`handforge.contracts.BatchAugmentation`)."""


@hookspec
def register_datasets(register):
    """Register sources of samples that follow the sample contract."""


@hookspec
def register_metrics(register):
    """Register measurements over samples or models."""


@hookspec
def register_tasks(register):
    """Register training programs: what one step does, and which component slots it has."""


@hookspec
def register_losses(register):
    """Register objective terms."""


@hookspec
def register_commands(cli):
    """Add CLI subcommands: ``cli.add_command(name, help, configure, handler)``; and converters
    run as ``handforge prepare NAME ...``: ``cli.add_preparer(name, help, configure, handler)``."""


@hookspec
def on_run_start(run):
    """The run is assembled (models prepared, resumed if asked) and about to take its first step."""


@hookspec
def on_step_end(run, step, logs):
    """A training step finished; ``logs`` maps names to detached scalar tensors."""


@hookspec
def on_eval_end(run, step, metrics):
    """Evaluation finished; ``metrics`` maps names to floats."""


@hookspec
def on_checkpoint_saved(run, step, path):
    """A checkpoint was written completely (atomically) to ``path``."""


@hookspec
def on_run_end(run, status):
    """The run ended; ``status`` is "completed", "failed" or "interrupted"."""
