"""Synthetic dataset export: the ``handforge generate`` command (:mod:`.generate`), its
``manifest.json`` (:mod:`.manifest`) and the ``generated`` dataset that reads an export back
(:mod:`.generated_dataset`). Registered through the same hooks a third-party plugin uses."""
from handforge import hookimpl


@hookimpl
def register_datasets(register):
    from .generated_dataset import GeneratedConfig, GeneratedImages, provides

    register("generated", GeneratedImages, config=GeneratedConfig, provides=provides)


@hookimpl
def register_commands(cli):
    from .generate import command, configure

    cli.add_command("generate", "export a trained generator's images as a labelled dataset (PNG + manifest.json)",
                    configure, command)
