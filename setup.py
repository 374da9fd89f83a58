"""odm-megatron: Online Data Mixing for Megatron-LM / megatron-core / DeepSpeed pretraining."""
from setuptools import find_packages, setup

setup(
    name="odm-megatron",
    version="0.1.0",
    description="Online Data Mixing (EXP3 bandit over data domains) for megatron-core pretraining",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["odm_megatron", "odm_megatron.*"]),
    # torch is a range on purpose: users bring their own (CUDA) build; README installs the CPU one.
    install_requires=[
        "torch>=2.3",
        # 0.16.1 (Python >= 3.10) up to 0.19.x; 0.17 and later need Python >= 3.12 (pip picks the
        # newest release the interpreter allows). Tested: 0.16.1 on 3.11, 0.19.2 on 3.12.
        "megatron-core>=0.16.1,<0.20",
        # torch_dist checkpoints (Megatron-LM's default format) start writer processes that need it.
        "psutil>=5.9",
        "numpy>=1.24",
        "sentencepiece>=0.1.99",
        "zstandard>=0.21",
        "tqdm>=4.60",
        "matplotlib>=3.6",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.14"],
        "hf": ["tokenizers>=0.15"],
        "tensorboard": ["tensorboard>=2.12"],
        "test": ["pytest>=7", "deepspeed>=0.14", "tensorboard>=2.12", "tokenizers>=0.15"],
    },
    entry_points={"console_scripts": ["odm-megatron=odm_megatron.cli:main"]},
)
