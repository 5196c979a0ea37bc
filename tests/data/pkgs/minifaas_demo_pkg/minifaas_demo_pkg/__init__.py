"""A tiny package for minifaas's dependency tests: importable only from a function's own environment."""

__version__ = "1.2.0"


def shout(text: str) -> str:
    return text.upper() + "!"
