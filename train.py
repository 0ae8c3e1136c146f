"""Entry point: `deepspeed --hostfile launch/hosts train.py [--config PRESET|FILE.yaml] [--set k=v ...]`.

Started bare (`python train.py`) it launches itself on the local GPUs, or on 2 CPU ranks.
"""
import sys

from furnace.training.launch import main

if __name__ == "__main__":
    sys.exit(main())
