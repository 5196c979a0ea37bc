"""Compositions at run time: the conductor that walks a ``minifaas.composer`` program, the session records it keeps,
and the deployed compositions a state dir keeps (``saved``).

May import: ``minifaas._errors``, ``minifaas.composer`` and ``minifaas._core`` (activation records). Must not import
``_engine``, ``_events``, ``_server``, ``_cli`` or ``_backends``: the engine hands the conductor what it calls.
"""
