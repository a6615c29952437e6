"""Errors a user can act on. The CLI prints their message and exits with code 2, no traceback."""


class HandforgeError(Exception):
    """Base class: the message alone must tell the user what is wrong and where."""


class RegistryError(HandforgeError):
    """An unknown, duplicate or malformed component registration or lookup."""


class PluginError(HandforgeError):
    """A plugin could not be loaded, or implements a hook that does not exist."""


class RecipeError(HandforgeError):
    """One or more problems in a recipe, each prefixed with its TOML path."""

    def __init__(self, problems, source=None):
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = f"{where}{self.problems[0]}"
        else:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{where}{len(self.problems)} problems:\n{listed}"
        super().__init__(message)


class DataError(HandforgeError):
    """A dataset could not be read, or a sample breaks the sample contract."""


class NonFiniteLossError(HandforgeError):
    """A loss term became NaN or infinite; the run stops and keeps its last good checkpoint."""


class ContractError(RegistryError):
    """A component is not what its kind must be (a loss without ``d_loss``, a dataset without
    ``__len__``): the message names the component, its plugin and what is missing."""
