"""ftddm_core — flow-based truncated denoising diffusion (FTDDM) for MRSI super-resolution.

Dong et al., "A Flow-based Truncated Denoising Diffusion Model for super-resolution MRSI",
Medical Image Analysis 2024. The engine of the MRSISuperResolution 3D Slicer extension.
"""
from .config import FTDDMConfig, preset

__version__ = "0.1.0"
__all__ = ["FTDDMConfig", "preset", "FTDDM", "load_model", "__version__"]


def __getattr__(name):
    # Lazy: `import ftddm_core` stays cheap (no torch network construction) for the CLI and Slicer.
    if name in ("FTDDM", "load_model"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'ftddm_core' has no attribute {name!r}")
