"""gvsl: GVSL (Geometric Visual Similarity Learning) for 3D medical images.

This module holds the version only, so that ``gvsl --help`` stays instant; the engine
lives in the submodules (``gvsl_cli.model``, ``gvsl_cli.spatial``, ...).
"""

__version__ = "0.1.0"
