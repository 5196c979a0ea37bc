"""The ``minifaas`` command (``main``) and the demo it runs: the outermost room, a client of everything else.

May import anything in the package. Nothing in the package imports it (the console script enters at ``main.main``).
"""
