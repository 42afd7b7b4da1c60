"""Exception types, one per failure kind.

Every message is written for a person: it names the file, row, field or model
involved and says what to do about it. Library code raises these instead of
letting a deep library traceback reach the user.
"""


class NfhmError(Exception):
    """Base class for every error this project raises on purpose."""


class CatalogError(NfhmError):
    """A catalog file is missing, malformed, or an entry has a bad field."""


class SettingsError(NfhmError):
    """An environment setting (NFHM_DEVICE, NFHM_PRECISION, …) has a value that cannot be used."""


class ManifestError(NfhmError):
    """A manifest source (CSV, folder, .npz) cannot be read as declared."""


class MissingWeightsError(NfhmError):
    """A model's weights are not available locally and cannot be fetched."""


class ModelLoadError(NfhmError):
    """Weights exist but the model cannot be built from them."""


class StorageError(NfhmError):
    """The data directory, lake or warehouse cannot be read or written."""


class EvaluationError(NfhmError):
    """Inputs to a metric are unusable (no test images, one class, ...)."""
