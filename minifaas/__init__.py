"""minifaas: a lightweight, in-process Function-as-a-Service runtime for Python AI functions.

::

    import minifaas

    async with minifaas.Engine() as engine:
        await engine.deploy("hello", code="def main(args):\n    return {'hi': args.get('name')}")
        print(await engine.invoke("hello", {"name": "Ada"}))
"""

from __future__ import annotations

from . import _composer as composer
from ._activation import Activation
from ._engine import Activations, Engine
from ._errors import (
    ActivationError,
    ActivationNotFound,
    ActivationTimeout,
    BackendUnavailable,
    CompositionError,
    DeployError,
    EngineClosed,
    FunctionNotFound,
    InvalidPayload,
    MinifaasError,
    ModelError,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    StateDirLocked,
    TriggerError,
)
from ._feeds import CronSchedule, FeedInfo
from ._sync import SyncEngine
from ._triggers import Rule, RuleOutcome, Trigger, TriggerActivation, TriggerManager
from ._versions import VersionInUse

__version__ = "0.1.0"

__all__ = (
    "Activation",
    "ActivationError",
    "ActivationNotFound",
    "ActivationTimeout",
    "Activations",
    "BackendUnavailable",
    "CompositionError",
    "CronSchedule",
    "DeployError",
    "Engine",
    "EngineClosed",
    "FeedInfo",
    "FunctionNotFound",
    "InvalidPayload",
    "MinifaasError",
    "ModelError",
    "Overloaded",
    "PayloadTooLarge",
    "RateLimited",
    "Rule",
    "RuleOutcome",
    "StateDirLocked",
    "SyncEngine",
    "Trigger",
    "TriggerActivation",
    "TriggerError",
    "TriggerManager",
    "VersionInUse",
    "__version__",
    "composer",
)

for _name in ("Activation", "Activations", "Engine", "SyncEngine"):
    globals()[_name].__module__ = "minifaas"
del _name
