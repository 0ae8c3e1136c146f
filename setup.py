from setuptools import setup

setup(
    name="furnace",
    version="0.1.0",
    description="Flamingo-style vision-language training on DeepSpeed: 3D parallel, ZeRO-3, Triton kernels",
    python_requires=">=3.10",
    # The Triton kernels live in kernels/ but import as `furnace_kernels`: transformers probes
    # for a distribution named `kernels`, so the bare name must stay free.
    packages=[
        "furnace",
        "furnace.config",
        "furnace.model",
        "furnace.parallel",
        "furnace.data",
        "furnace.presets",
        "furnace.training",
        "furnace_kernels",
    ],
    package_dir={"furnace_kernels": "kernels"},
    package_data={"furnace.presets": ["*.yaml"], "furnace_kernels": ["attention_configs.json"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "safetensors>=0.4",
        "accelerate>=0.34",  # init_empty_weights: models built without weights, then filled
        "numpy>=1.24,<2.4",
        "pyyaml>=6",
        "pillow>=9",
        "tqdm>=4.60",
        "deepspeed>=0.16",
        "ninja>=1.11",  # builds DeepSpeed's CPU Adam once, for ZeRO-Offload
        "webdataset>=0.2.86",
        "tokenizers>=0.19",
        "tensorboard>=2.12",
        "pycocoevalcap>=1.2",  # the COCO caption metrics (BLEU, ROUGE-L, CIDEr; METEOR with Java)
        # Video clips (furnace.data.video): PyAV's wheels bundle FFmpeg, and it pulls in no
        # torchvision (none builds for the pinned CPU torch; transformers imports it when present).
        "av>=18",
        "triton>=3.0; platform_system == \"Linux\"",
    ],
    extras_require={
        # bitsandbytes also in "test", so CI runs tests/test_quantize.py instead of skipping it
        # einops/einops-exts: open_flamingo's helpers.py, which tests/test_open_flamingo.py runs
        # from its wheel (open_flamingo itself pins torch==2.0.1, so it is never installed)
        # peft: tests/test_lora.py loads furnace-export's --lora peft adapter folder with it.
        # (open_clip is not listed: it needs torchvision, which has no build for the pinned CPU
        # torch; tests/test_open_clip.py runs its model code from its wheel.)
        "test": ["pytest>=7", "bitsandbytes>=0.48", "einops>=0.6", "einops-exts>=0.0.4", "peft>=0.13"],
        "quantize": ["bitsandbytes>=0.48"],  # int8 / NF4 decoding, --quantize (furnace.model.quantize)
    },
    entry_points={
        "console_scripts": [
            "furnace-shards=furnace.data.shards:main",
            "furnace-train=furnace.training.launch:main",
            "furnace-export=furnace.export:main",
            "furnace-generate=furnace.generate:main",
            "furnace-eval=furnace.evaluate:main",
            "furnace-plan=furnace.plan:main",
            "furnace-import=furnace.import_checkpoint:main",
        ]
    },
)
