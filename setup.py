"""rear_ds: DeepSpeed-scaled training, sampling and evaluation for reAR (arXiv 2510.04450)."""
from setuptools import find_packages, setup

setup(
    name="rear_ds",
    version="0.1.0",
    description="DeepSpeed-scaled training system for reAR visual autoregressive image generators",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rear_ds", "rear_ds.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision",  # torch-fidelity imports it
        "deepspeed>=0.16",
        "webdataset>=0.2.86",
        "einops",
        "pyyaml",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "tqdm",
        "scipy",
        "torch-fidelity>=0.3",
        "wandb",
    ],
    extras_require={
        # apex is optional and not on the package index: rear_ds detects it at import time.
        "test": ["pytest>=7", "pytest-timeout"],
    },
    entry_points={
        "console_scripts": [
            "rear-model-info=rear_ds.model_info:main",
            "rear-ablate=rear_ds.ablate:main",
        ],
    },
)
