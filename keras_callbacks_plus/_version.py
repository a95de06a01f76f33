"""The version of keras_callbacks_plus, in one place: `setup.cfg` and the package read it here."""

__version__ = "0.1.0.dev0"
