"""fairseq_thor: THOR (Transformer witH StOchastic ExpeRts, Zuo et al., ICLR 2022) as a fairseq plugin."""
import sys

from setuptools import find_packages, setup

# fairseq 0.12.2 does not import on Python >= 3.11 (a mutable dataclass default in its config);
# fairseq-fixed 0.12.3.1 ships the same `fairseq` module with that fixed. Pinned exactly because the
# plugin subclasses fairseq internals (layer hooks, criterion, checkpoint utils) that move between
# releases.
FAIRSEQ = "fairseq-fixed==0.12.3.1" if sys.version_info >= (3, 11) else "fairseq==0.12.2"

setup(
    name="fairseq_thor",
    version="0.1.0",
    description="THOR stochastic experts for fairseq: expert layers, consistency criterion, tasks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    classifiers=["Programming Language :: Python :: 3"],  # the license: SPDX "MIT" above
    packages=find_packages(include=["fairseq_thor", "fairseq_thor.*"]),
    python_requires=">=3.8",
    install_requires=[
        # A range, not a pin: any torch fairseq 0.12 runs on works. Installing torch==2.13.0 first
        # (the Makefile does) keeps pip from pulling a CUDA build on a CPU machine.
        "torch>=1.13",
        FAIRSEQ,
        "fairscale>=0.4.13",  # MOELayer with all-to-all, used for expert parallelism
        "sacrebleu>=2.0",
        "sentencepiece>=0.1.99",
    ],
    extras_require={
        # matplotlib: benchmarks/quality.py's plots (its toy runs are tests); pytest-xdist: make test's
        # two workers; filelock: one toy demo corpus shared by those workers (torch installs it too)
        "test": ["pytest>=7", "pytest-xdist>=3", "filelock>=3", "sacremoses>=0.2", "subword-nmt>=0.3.8",
                 "matplotlib>=3.5"],
        "recipes": ["sacremoses>=0.2", "subword-nmt>=0.3.8"],  # examples/iwslt14_de_en, wmt16_en_de
        "bench": ["matplotlib>=3.5"],
        # fairseq-thor-export-ctranslate2 and fairseq_thor.serving.translator; 4.x reads fairseq
        # checkpoints with torch's safe loader (the plugin allow-lists what they hold)
        "serve": ["ctranslate2>=4.0,<5"],
    },
    entry_points={
        "console_scripts": [
            "fairseq-thor-user-dir=fairseq_thor.path:main",
            "fairseq-thor-train=fairseq_thor.distributed.train_cli:main",
            "fairseq-thor-consolidate=fairseq_thor.distributed.consolidate:consolidate_main",
            "fairseq-thor-reshard=fairseq_thor.distributed.consolidate:reshard_main",
            "fairseq-thor-export-dense=fairseq_thor.export_dense:main",
            "fairseq-thor-export-ctranslate2=fairseq_thor.serving.ctranslate2_export:main",
            "fairseq-thor-average=fairseq_thor.average:main",
        ]
    },
)
