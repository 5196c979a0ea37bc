"""minifaas: a lightweight, in-process Function-as-a-Service runtime for Python AI functions.

::

    import minifaas

    async with minifaas.Engine() as engine:
        await engine.deploy("hello", code="def main(args):\n    return {'hi': args.get('name')}")
        print(await engine.invoke("hello", {"name": "Ada"}))
"""

from __future__ import annotations

from . import composer
from ._core.activation import Activation
from ._deploy.versions import AliasMismatch, VersionInUse
from ._engine import Activations, Engine
from ._errors import (
    ActivationError,
    ActivationNotFound,
    ActivationTimeout,
    BackendUnavailable,
    CompositionError,
    CredentialsError,
    DeployError,
    EngineClosed,
    FunctionNotFound,
    InvalidPayload,
    MinifaasError,
    ModelError,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    StateDirConflict,
    StateDirLocked,
    StateDirReadOnly,
    TriggerError,
)
from ._events.feeds import CronSchedule, FeedInfo
from ._events.triggers import Rule, RuleOutcome, Trigger, TriggerActivation, TriggerManager
from ._handles import Function, SyncFunction, function
from ._map import MapIterator
from ._sync import SyncEngine
from ._workflows.conductor import current_session_id

__version__ = "0.1.0"

__all__ = (
    "Activation",
    "ActivationError",
    "ActivationNotFound",
    "ActivationTimeout",
    "Activations",
    "AliasMismatch",
    "BackendUnavailable",
    "CompositionError",
    "CredentialsError",
    "CronSchedule",
    "DeployError",
    "Engine",
    "EngineClosed",
    "FeedInfo",
    "Function",
    "FunctionNotFound",
    "InvalidPayload",
    "MapIterator",
    "MinifaasError",
    "ModelError",
    "Overloaded",
    "PayloadTooLarge",
    "RateLimited",
    "Rule",
    "RuleOutcome",
    "StateDirConflict",
    "StateDirLocked",
    "StateDirReadOnly",
    "SyncEngine",
    "SyncFunction",
    "Trigger",
    "TriggerActivation",
    "TriggerError",
    "TriggerManager",
    "VersionInUse",
    "__version__",
    "composer",
    "current_session_id",
    "function",
)

for _name in (
    "Activation",
    "Activations",
    "Engine",
    "Function",
    "MapIterator",
    "SyncEngine",
    "SyncFunction",
    "current_session_id",
    "function",
):
    globals()[_name].__module__ = "minifaas"
del _name
