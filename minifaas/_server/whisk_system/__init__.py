"""The sources of the system catalog's actions (``/whisk.system/utils/*``, ``/whisk.system/alarms/*``).

Each module is one action's code, deployed as it is by ``_server.catalog`` and run in a sandbox like any user
action: it imports nothing of the host (a feed action asks the host through ``minifaas_sandbox.host_call``).
"""
