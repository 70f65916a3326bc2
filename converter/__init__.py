"""Workstation side: Keras model -> TFLite training bundle (builtin ops only).

Importing this package does not import TensorFlow; the modules that need it do.
"""

__version__ = "0.1.0"
