"""ddp-train: data-parallel training of multilayer perceptrons on CPUs."""

__version__ = "0.1.0"
