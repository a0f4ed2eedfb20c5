"""Usher's local node manager and its hypervisor backends."""
