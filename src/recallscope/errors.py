"""Errors recallscope raises on bad input.

Every error says what is wrong and how to fix it. They all derive from :class:`RecallscopeError`
(itself a ``ValueError``), so ``except RecallscopeError`` catches every input problem the library
detects, while genuine bugs still surface as other exception types.
"""


class RecallscopeError(ValueError):
    """Base class: an input recallscope cannot work with. The message names the fix."""


class InvalidBase64Error(RecallscopeError):
    """A string is not valid base64 (wrong alphabet, length or padding)."""


class LengthMismatchError(RecallscopeError):
    """Token sequences that must have equal length (clean/corrupt pairs) do not."""


class MultiTokenAnswerError(RecallscopeError):
    """An answer spans several tokens where the method needs exactly one."""


class SiteOutOfRangeError(RecallscopeError):
    """A layer, head or position index lies outside the model or the prompt."""


class UnknownModelError(RecallscopeError):
    """A model spec names nothing recallscope knows how to load."""


class WeightsUnavailableError(RecallscopeError):
    """The weights for a model spec are not on this machine and cannot be downloaded."""


class EmptyDatasetError(RecallscopeError):
    """A dataset, prompt list or task has no items."""


class DuplicateItemError(RecallscopeError):
    """A dataset holds the same item twice where items must be unique."""


class PromptTooLongError(RecallscopeError):
    """A prompt has more tokens than the model's context window."""


class DatasetFormatError(RecallscopeError):
    """A user data file (JSONL, CSV, TSV) is malformed: the message names the file, line and field."""


class NonFiniteMetricError(RecallscopeError):
    """A metric returned NaN or inf; the message names the site where it happened."""


class ResultFileError(RecallscopeError):
    """A saved result is missing, truncated or does not match its manifest."""


class ConfigError(RecallscopeError):
    """A configuration value is invalid or inconsistent with the model or task."""


class NonFiniteActivationError(RecallscopeError):
    """A forward pass produced inf or NaN activations (float16 overflow, or broken weights)."""


class DeviceError(RecallscopeError):
    """A requested device does not exist here, or tensors and the model sit on different devices."""


class CheckpointError(RecallscopeError):
    """A checkpoint directory cannot be created or written."""
