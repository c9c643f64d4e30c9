"""The llamabox runtime: what runs inside a bundled executable."""

__version__ = "0.1.0"
