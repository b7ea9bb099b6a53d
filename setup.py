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
    install_requires=[  # what rear_ds imports (tests/test_dependencies.py checks it)
        "torch>=2.4",
        "deepspeed>=0.16",
        "webdataset>=1.0,<2",  # writer + tar parsing of the token shards (tested with 1.0.2)
        "braceexpand",  # data.shards patterns
        "einops",  # the AliTok tokenizer
        "psutil",
        "pyyaml",
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "tqdm",
        "torch-fidelity>=0.3",  # brings torchvision and its own dependencies
        "wandb",
    ],
    extras_require={
        # apex is optional and not on the package index: rear_ds detects it at import time.
        "test": ["pytest>=7", "pytest-timeout"],
    },
    entry_points={
        "console_scripts": [
            "rear-model-info=rear_ds.model_info:main",
        ],
    },
)
