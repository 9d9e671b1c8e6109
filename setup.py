"""Installs ftddm_core (the FTDDM engine) and the `ftddm` command."""
import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("ftddm_core/__init__.py").read_text()).group(1)

setup(
    name="ftddm_core",
    version=version,
    description="Flow-based truncated denoising diffusion (FTDDM) super-resolution for MR spectroscopic imaging",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ftddm_core", "ftddm_core.*"]),
    package_data={"ftddm_core": ["weights/*.safetensors", "weights/*.json", "weights/*.md"]},
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "SimpleITK>=2.2",
        "nibabel>=5.0",
        "safetensors>=0.4",
        "scikit-image>=0.21",
        "pytorch-msssim>=1.0",
        "matplotlib>=3.7",
        "nilearn>=0.10",
        "tqdm>=4.60",
    ],
    extras_require={
        # `ftddm bids` (docs/bids.md): pybids queries the dataset (it brings bidsschematools, the schema tools).
        "bids": ["pybids>=0.16"],
        # Only `make test` installs these (`make demo` does not): diffusers = reference schedulers; slicer-core =
        # Slicer's real MRML libraries (it brings vtk) for the module's tests; pybids for `ftddm bids`, and
        # dask.distributed for the cohort example (scripts/cohort/dask_cohort.py) the tests run.
        "test": ["pytest>=7", "diffusers>=0.30", "slicer-core==5.12.4.0", "pybids>=0.16", "distributed>=2023.1"],
    },
    entry_points={"console_scripts": ["ftddm=ftddm_core.cli:main"]},
)
