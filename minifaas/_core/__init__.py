"""The engine's core: activations, the scheduler, the sandbox pool, sandboxes and how they are launched (spawn, zygote).

May import: the standard library, third-party runtime dependencies, ``minifaas_sandbox.protocol``,
``minifaas._errors`` and ``minifaas._deploy`` (a function spec holds its bundle). Must not import ``_engine``,
``_workflows``, ``_events``, ``_server``, ``_cli`` or ``_backends``: everything else stands on the core.
"""
