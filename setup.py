from setuptools import find_packages, setup

setup(
    name="flashmoe_py",
    version="0.1.0",
    description="A fused, expert-parallel Mixture-of-Experts layer for one multi-GPU node",
    packages=find_packages(include=["flashmoe_py", "flashmoe_py.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "triton>=3.2", "numpy"],
    extras_require={
        "gpu": ["nvshmem4py-cu13", "cuda-python"],
        "mpi": ["mpi4py"],
        "bench": ["matplotlib", "tqdm"],
        "test": ["pytest>=7", "pytest-timeout", "transformers>=5"],
    },
)
