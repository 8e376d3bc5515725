"""The package version, in a module of its own so that recording it (plans, fingerprints, bundles) does not import
the package's ``__init__`` and, through its lazy Python API, every stage."""

__version__ = "0.1.0"
