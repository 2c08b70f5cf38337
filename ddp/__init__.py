"""ddp-train: data-parallel training of multilayer perceptrons on CPUs."""
import os as _os

__version__ = "0.1.0"

# Installed, the roles are the subpackages ddp.worker and ddp.coordinator (pyproject's
# package-dir maps them from the repository's top-level worker/ and coordinator/). In
# a source checkout they are those folders beside this one: look there too.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "coordinator")) and all(
        _os.path.isfile(_os.path.join(_checkout, role, "__init__.py")) for role in ("worker", "coordinator")):
    __path__.append(_checkout)

__all__ = ["Model", "train", "__version__"]


def __getattr__(name):
    # Imported on first use: the console scripts import ddp and need neither.
    if name == "Model":
        from .api_model import Model

        return Model
    if name == "train":
        from .api import train

        return train
    raise AttributeError(f"module 'ddp' has no attribute {name!r}")
