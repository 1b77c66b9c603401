"""bigmodel: pretraining multimodal (image + text) encoders across many GPUs and nodes."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

# torch is deliberately a lower bound only: install the build you want (CUDA or CPU) first, then this package.
INSTALL_REQUIRES = [
    "torch>=2.6",
    "numpy>=1.24",
    "pyyaml>=6.0",
    "pydantic>=2.7",
    "tokenizers>=0.19",
    "webdataset>=0.2.86",
    "pillow>=10.0",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "xxhash>=3.0",  # checkpoint checksums (bigmodel.checkpoint.sharded)
    "fsspec>=2024.6",  # shard locations: local, s3:// (with the remote extra), http(s):// (bigmodel.data.locations)
]

EXTRAS = {
    "deepspeed": ["deepspeed>=0.16"],
    "hf": ["transformers>=4.45", "accelerate>=1.0"],
    "wandb": ["wandb>=0.18"],
    "plot": ["matplotlib>=3.8"],
    # Shards in object storage (s3://, through the standard AWS environment and files) and over http(s)://.
    "remote": ["s3fs>=2024.6", "aiohttp>=3.9"],
}
# Reference clients and servers the tests run against: a real S3-API server on loopback (moto's standalone server,
# shards uploaded with boto3), OpenCLIP's transforms and tokenizer, scikit-learn's bundled photos.
TEST_REQUIRES = ["moto[server]>=5.0", "s3fs[boto3]>=2024.6", "open_clip_torch>=3.0", "scikit-learn>=1.4"]
EXTRAS["dev"] = sorted(
    {
        "pytest>=8.0",
        "pytest-timeout>=2.3",
        "ruff>=0.6",
        *EXTRAS["deepspeed"],
        *EXTRAS["hf"],
        *EXTRAS["wandb"],
        *EXTRAS["plot"],
        *EXTRAS["remote"],
        *TEST_REQUIRES,
    }
)
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="bigmodel",
    version="0.1.0",
    description="Pretraining multimodal (image + text) encoders with tensor, pipeline and ZeRO data parallelism",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["bigmodel", "bigmodel.*"]),
    package_data={"bigmodel": ["data/assets/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["bigmodel=bigmodel.cli.main:main"]},
    license="Apache-2.0",
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
