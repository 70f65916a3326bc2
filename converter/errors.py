"""Errors the converter raises with a message that names the layer, option or op at fault."""


class ConversionError(ValueError):
    """The model cannot be turned into a training bundle as asked."""
