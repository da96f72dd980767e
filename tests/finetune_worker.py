"""Run by tests/test_finetune.py under torchrun (2 processes, gloo): fine-tunes with the FinetuneArgs given as
JSON, once per entry, in one process group; an entry's "stop_after" ends that run there (as an interruption)."""
import json
import sys

import torch.distributed as dist

from posenc.training import FinetuneArgs, finetune

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        for kwargs in json.loads(sys.argv[1]):
            stop_after = kwargs.pop("stop_after", None)
            finetune(FinetuneArgs(**kwargs), stop_after=stop_after)
    finally:
        dist.destroy_process_group()
