"""ParaDySe: adaptive layer-wise parallel strategy switching for LLM training."""

from pathlib import Path

from setuptools import setup

HF = [
    "transformers==4.57.3",
    "safetensors>=0.4",
    "tokenizers>=0.21",
    "gguf>=0.10",
    "accelerate>=1.0",
]

# megatron-core's own modules inside ParaDySe's attention (integrations.megatron): pure Python,
# pulls only numpy and packaging; psutil is what its dist_checkpointing imports undeclared.
MEGATRON = ["megatron-core==0.16.1", "psutil"]

setup(
    name="paradyse",
    version="0.1.0",
    description=(
        "Per-micro-batch, per-layer parallel strategy and recompute selection for LLM training "
        "on sequences of wildly varying length"
    ),
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[
        "paradyse",
        "paradyse.data",
        "parallel_lib",
        "parallel_lib.strategies",
        "cost_models",
        "cost_models.strategy_costs",
        "planners",
        "integrations",
        "integrations.hf",
        "integrations.grass",
        "integrations.alloc_moe",
        "integrations.megatron",
    ],
    # torch is pinned by constraints.txt in `make setup`; a bare `torch` here would let pip pull a
    # multi-GB CUDA build on machines where the CPU wheel is the one wanted.
    install_requires=["torch>=2.6", "numpy>=1.24"],
    entry_points={"console_scripts": ["paradyse-train = paradyse.train:main"]},
    extras_require={
        # Hugging Face models in and out (integrations.hf); transformers pinned to what is tested
        "hf": HF,
        # problems with answer checkers for the fine-tuning example (integrations.hf.tasks)
        "tasks": ["reasoning-gym==0.1.25"],
        # megatron-core models with ParaDySe's attention (integrations.megatron)
        "megatron": MEGATRON,
        # megatron-core is small and pure Python: CI runs the integration's tests too (they skip
        # where it is absent, and nothing else needs it)
        "test": ["pytest>=8", "ruff>=0.6", *HF, "reasoning-gym==0.1.25", *MEGATRON],
        "gpu": ["nvidia-ml-py"],
    },
)
