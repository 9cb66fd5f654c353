"""The block layer: nodes, drivers, permissions, image locks, activation and inactivation.

It knows nothing of JSON or sockets; :mod:`qmp_server` adapts it to QMP commands.
"""
