"""Plugins shipped with Usher (installed as ``usher.plugins``).

Each module here is an *available* plugin; see ``usher.controller.plugins``
for the contract and the README for a complete example.
"""
