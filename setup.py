"""fal_d2: FPN-ABN Layered networks (FAL) for Detectron2."""
import os

from setuptools import find_packages, setup


def read_version():
    """fal_d2/version.py's __version__, read without importing fal_d2 (which needs Detectron2)."""
    namespace = {}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fal_d2", "version.py")
    with open(path) as f:
        exec(f.read(), namespace)
    return namespace["__version__"]


setup(
    name="fal_d2",
    version=read_version(),
    description="Attention branches on chosen FPN levels, with built-in visual explanations, for Detectron2",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["fal_d2", "fal_d2.*"]),
    # Detectron2 itself is not on PyPI: tools/bootstrap_env.sh builds it (see README).
    install_requires=[
        "torch>=1.10",
        "torchvision",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "pycocotools>=2.0.2",
        "omegaconf>=2.1",
        "hydra-core>=1.1",
        "yacs>=0.1.8",
        "numpy",
        "opencv-python-headless",
        "Pillow>=7.1",
        "matplotlib",
        "tabulate",
        "termcolor>=1.1",
        "tqdm>4.29",
        "tensorboard",
    ],
    extras_require={"test": ["pytest"]},
)
