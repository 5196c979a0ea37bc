"""What a deploy produces before anything runs: bundles, callables by value, dependency environments, versions and
aliases, the model store.

May import: the standard library, third-party runtime dependencies, ``minifaas._errors`` and ``minifaas_sandbox``
(what a sandbox will accept). Must not import ``_core`` or anything above it: a deploy is prepared without a
running engine.
"""
