"""What a deploy produces before anything runs: bundles, dependency environments, versions and aliases, the model store.

May import: the standard library, third-party runtime dependencies and ``minifaas._errors``. Must not import
``_core`` or anything above it: a deploy is prepared without a running engine.
"""
