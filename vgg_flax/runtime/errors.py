"""Error types the command lines answer with a short message instead of a traceback."""


class UsageError(ValueError):
  """A flag or config value is not allowed (the command lines exit with 2)."""


class WeightImportError(ValueError):
  """A weights file does not hold the expected VGG tensors."""
