"""Usher: an extensible framework for managing clusters of virtual machines."""

__version__ = "1.0.0.dev0"
