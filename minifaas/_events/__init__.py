"""Events: triggers, rules and the feeds that fire them (folder, object store, alarms), with the clock they run on.

May import: ``minifaas._errors`` and ``minifaas._core``. Must not import ``_engine``, ``_workflows``, ``_server``,
``_cli`` or ``_backends``: a rule reaches the engine only through the ``submit`` callable it is given.
"""
