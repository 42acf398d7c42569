"""Typed errors for every failure a caller of the library can cause.

Callers (the server, the worker, the CLI) map these to user-facing messages; the messages are written
for the person who has to act on them.
"""

from __future__ import annotations


class FmloraError(Exception):
    """Base of every error the library raises on purpose."""


class ConfigError(FmloraError, ValueError):
    """A configuration value is invalid or inconsistent with the model."""


class BackboneError(FmloraError):
    """The backbone cannot be created or its weights cannot be loaded."""


class WeightsNotFoundError(BackboneError, FileNotFoundError):
    """A local backbone weight file does not exist or has an unsupported format."""


class InjectionError(FmloraError):
    """Adapter targets do not match the backbone's modules."""


class AdapterStateError(FmloraError, RuntimeError):
    """An adapter operation was called in the wrong state (e.g. folding with no task in progress)."""


class TaskError(FmloraError, ValueError):
    """A task's definition is invalid: empty, duplicate or unknown classes, bad kind."""


class UnknownTaskError(TaskError, KeyError):
    """A task name was given that the model has not learned."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PromptError(FmloraError, ValueError):
    """A meta-prompt selection is malformed."""


class SnapshotError(FmloraError):
    """Base of snapshot failures; raised before any model state is modified."""


class SnapshotFormatError(SnapshotError):
    """The snapshot directory is incomplete or its files do not follow the format."""


class SnapshotIntegrityError(SnapshotError):
    """The tensor file does not match the sha256 recorded in the manifest."""


class SnapshotCompatibilityError(SnapshotError):
    """The snapshot was made for another backbone, adapter layout or format version."""


class SnapshotExistsError(SnapshotError, FileExistsError):
    """Publishing would overwrite an existing (immutable) snapshot."""


class DataError(FmloraError, ValueError):
    """Input data is malformed (wrong shape, dtype, empty split)."""


class RegistryError(FmloraError):
    """The registry (FMLORA_HOME) is unusable or an operation conflicts with its state."""


class RegistryConfigError(RegistryError, ConfigError):
    """The registry was created for another model configuration than the one given."""


class TaskNotFoundError(RegistryError, LookupError):
    """No task with that id exists in the registry."""


class VersionNotFoundError(RegistryError, LookupError):
    """No published version with that number exists in the registry."""


class VersionStateError(RegistryError):
    """The version exists but its state forbids the operation (e.g. activating a rejected candidate)."""


class LeaseError(RegistryError):
    """A worker lost (or never held) the lease on the task it is working on."""


class IntakeError(FmloraError, ValueError):
    """An uploaded task was refused; nothing of it was stored."""


class ArchiveFormatError(IntakeError):
    """The upload is not a readable zip or tar archive."""


class ArchiveTooLargeError(IntakeError):
    """The upload exceeds a size, file-count or unpacked-size limit."""


class UnsafeArchiveError(IntakeError):
    """The archive holds absolute paths, '..' components, links, devices or other unsafe members."""


class InvalidImageError(IntakeError):
    """A file in the archive is not a decodable image (or exceeds the pixel limit)."""


class ClassLayoutError(IntakeError):
    """The archive's class folders are wrong: too few images, bad or duplicate names, classes that
    conflict with what the model already knows for this kind of task."""


class TaskConflictError(IntakeError):
    """The task conflicts with the registry (e.g. its name is already taken)."""


class RegistryUnavailableError(RegistryError):
    """The registry database cannot be reached now (down, restarting, network); retrying later may work."""


class DuplicateKeyError(RegistryError):
    """A write would create a second row with a key that must be unique (the backend's integrity error)."""


class WorkerStateError(RegistryError):
    """A version's worker state is missing or cannot be parsed."""


class StoreError(FmloraError):
    """The artifact store (snapshots, worker state, task archives) failed an operation."""


class StoreConfigError(StoreError, ConfigError):
    """The artifact store's URL, bucket or credentials are wrong; the message names the setting."""


class StoreUnavailableError(StoreError):
    """The artifact store cannot be reached now; retrying later may work."""


class ObjectNotFoundError(StoreError, LookupError):
    """An object the registry points at is not in the store."""


class ObjectIntegrityError(StoreError):
    """An object's bytes do not match the sha256 the registry recorded for it."""


class WorkerStateIntegrityError(ObjectIntegrityError, WorkerStateError):
    """A version's worker state does not match its recorded sha256: it is refused, never used."""
