"""The one exception hierarchy of minifaas.

Every exception minifaas raises on purpose derives from :class:`MinifaasError`. Their ``__module__`` is set to
``"minifaas"`` so that a pickled or logged error names the public import path, not a private module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._core.activation import Activation

__all__ = (
    "ActivationError",
    "ActivationNotFound",
    "ActivationTimeout",
    "BackendUnavailable",
    "CompositionError",
    "CredentialsError",
    "DeployError",
    "EngineClosed",
    "FunctionNotFound",
    "InvalidPayload",
    "MinifaasError",
    "ModelError",
    "Overloaded",
    "PayloadTooLarge",
    "RateLimited",
    "StateDirConflict",
    "StateDirLocked",
    "StateDirReadOnly",
    "TriggerError",
)


class MinifaasError(Exception):
    """Base class of every error minifaas raises on purpose."""


class DeployError(MinifaasError, ValueError):
    """Raised by ``Engine.deploy`` when code or a bundle is invalid (syntax, missing main, bad path or zip)."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None) -> None:
        where = ""
        if file is not None:
            where = f" ({file}" + (f", line {line}" if line is not None else "") + ")"
        super().__init__(message + where)
        self.file = file
        self.line = line


class FunctionNotFound(MinifaasError, LookupError):
    """Raised by ``invoke``/``submit``/``delete`` when no function (or version/alias) of that name is deployed."""


class InvalidPayload(MinifaasError, TypeError):
    """Raised by ``invoke``/``submit`` when the arguments are not a dict of JSON-like values."""


class PayloadTooLarge(MinifaasError, ValueError):
    """Raised by ``invoke``/``submit`` when the encoded arguments exceed the payload limit."""


class Overloaded(MinifaasError):
    """Raised by ``invoke``/``submit`` at once when the function's or the engine's queue is full."""


class RateLimited(Overloaded):
    """Raised when a trigger or namespace is fired more often than its rate limit allows."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        #: seconds until a retry may succeed (an HTTP 429 says it as Retry-After), when known
        self.retry_after_s = retry_after_s


class EngineClosed(MinifaasError, RuntimeError):
    """Raised by every ``Engine`` method called before the engine is started or after it is closed."""


class StateDirLocked(MinifaasError, RuntimeError):
    """Raised by ``Engine.__aenter__`` when another engine (any process) holds the same ``state_dir``."""


class StateDirReadOnly(MinifaasError, RuntimeError):
    """Raised when an engine opened with ``read_only=True`` is asked to run a function (it only reads records)."""


class ActivationNotFound(MinifaasError, LookupError):
    """Raised by ``engine.activations.get``/``wait`` when no activation has that id."""


class ActivationTimeout(MinifaasError, TimeoutError):
    """Raised by ``engine.activations.wait`` when the activation has not ended within ``timeout_s``."""


class ActivationError(MinifaasError):
    """Raised by ``Engine.invoke`` when the activation ended with a status other than success."""

    def __init__(self, activation: Activation) -> None:
        err = activation.result.get("error") if isinstance(activation.result, dict) else None
        super().__init__(f"{activation.name} [{activation.activation_id}] {activation.status}: {err}")
        self.activation = activation

    def __reduce__(self) -> tuple[type[ActivationError], tuple[Activation]]:
        return (type(self), (self.activation,))


class ModelError(MinifaasError):
    """Raised by the model store when a model cannot be fetched, is too large or fails its sha256 check."""


class CompositionError(MinifaasError, ValueError):
    """Raised when a composition is malformed or a session exceeds its step limit."""


class TriggerError(MinifaasError):
    """Raised by trigger, rule and feed operations on unknown or invalid entities."""


class BackendUnavailable(MinifaasError, ImportError):
    """Raised by ``Engine(backend=...)`` when a backend's optional dependency is missing."""


class StateDirConflict(MinifaasError):
    """Raised by ``Engine`` start when its ``state_dir`` was created for another namespace."""


class CredentialsError(MinifaasError, ValueError):
    """Raised by ``minifaas serve`` when the ``uuid:key`` kept in its state dir is unreadable or malformed."""


for _name in __all__:
    globals()[_name].__module__ = "minifaas"
