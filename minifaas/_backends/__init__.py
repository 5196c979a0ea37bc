"""Optional backends, chosen by name and imported lazily by the engine: ``ray`` runs sandboxes as Ray actors.

May import ``minifaas._core``, ``minifaas._deploy`` and ``minifaas._errors``. Must not import ``_engine``,
``_workflows``, ``_events``, ``_server`` or ``_cli``. Importing a backend whose dependency is missing raises
``BackendUnavailable`` with the install hint.
"""
