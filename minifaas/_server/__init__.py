"""The dev server: the OpenWhisk-compatible REST API (``app``), the web UI's JSON API and static files, metrics.

May import everything below it (``_engine``, ``_core``, ``_deploy``, ``_workflows``, ``_events``, ``_errors``,
``composer``). Must not import ``_cli``: the command line starts the server, not the other way round.
"""
