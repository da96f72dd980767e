"""Run by tests/test_finetune.py under torchrun (2 processes, gloo): fine-tunes with the FinetuneArgs given as
JSON, once per entry, in one process group (DDP, then FSDP2)."""
import json
import sys

import torch.distributed as dist

from posenc.training import FinetuneArgs, finetune

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        for kwargs in json.loads(sys.argv[1]):
            finetune(FinetuneArgs(**kwargs))
    finally:
        dist.destroy_process_group()
