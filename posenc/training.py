"""Fine-tuning a transformers causal LM with another positional encoding: what `posenc finetune` runs.

    from posenc.training import FinetuneArgs, finetune
    summary = finetune(FinetuneArgs(model="smollm2", encoding="hope:4096", output="runs/hope", steps=200))
    # runs/hope: the fine-tuned model (AutoModelForCausalLM.from_pretrained after `import posenc`),
    # log.jsonl (one JSON line per step), finetune.json (how it was made), checkpoints/step-NNNNNNNN/

The same call under `torchrun --nproc-per-node N` trains data-parallel (DDP; FSDP2 with fsdp=True), NCCL on
GPUs and gloo on CPUs.

How a run is put together, and why:
- Data (posenc.data): the corpus's documents are split by document into training and held-out parts with
  a fixed split (posenc.data.split_documents, held_out=0.1, seed 0, whatever the run's seed); the held-out
  rows give the loss before and after training. (`posenc eval` reads whole corpora: to measure on documents
  never trained on, give each its own directory, as scripts/study.py does.) Training documents are
  tokenized in a seeded order and packed into rows of seq_len tokens whose positions restart at each
  document. transformers keeps attention inside each
  document by reading those restarting position_ids (masking_utils.find_packed_sequence_indices) - but only
  when the call has neither an attention mask nor a cache. A model in training mode creates a DynamicCache
  unless told not to, and then attends across documents: every call here passes use_cache=False.
- Order: optimizer step s reads rows s*G .. (s+1)*G - 1 (G = the global batch: batch_size x grad_accum x
  processes) of an endless chain of seeded permutations of the rows. The rows of a step follow from the step
  alone, so a resumed run reads exactly the rows the uninterrupted one would, with any number of processes.
- Loss: summed token losses over the global batch divided by its number of predicted tokens, however the
  batch is split over processes and accumulation steps, so N processes give one process's numbers.
- Precision: fp32 weights and AdamW state, bf16 autocast for the forward and backward (dtype="float32":
  none), gradient clipping on the global norm, warmup then cosine decay to min_lr_ratio * lr.
- Checkpoints (every save_every steps; the newest is kept, and removed when the run finishes): model
  (trainable parameters only, for LoRA) and optimizer through torch.distributed.checkpoint (sharded under
  FSDP, reshardable), the scheduler, the step and each process's RNG state, written into a temporary directory
  that os.replace puts in place. `resume` restarts from the newest one after checking that the recorded
  arguments and data are this run's.
- Output: the model saved with save_pretrained (LoRA: merged into the base, with the adapter alone in
  adapter/), the tokenizer, and finetune.json, written last.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from .data import iter_encoded, load_corpus, pack, split_documents
from .io import check_writable_dir, write_json
from .progress import Progress
from .specs import parse_spec

__all__ = ["FinetuneArgs", "FinetuneError", "finetune", "lr_factor", "flops_per_token", "matmul_parameters",
           "step_rows", "packed_logits", "H200_BF16_PEAK_FLOPS", "HELD_OUT", "SPLIT_SEED"]

# Dense bf16 peak of one H200 (SXM), for model FLOPs utilisation.
H200_BF16_PEAK_FLOPS = 989e12
# The held-out split posenc.data.split_documents makes by default (and `posenc eval` measures on).
HELD_OUT = 0.1
SPLIT_SEED = 0
LOG_NAME, RECORD_NAME, RUN_NAME, CHECKPOINTS = "log.jsonl", "finetune.json", "run.json", "checkpoints"
# Arguments that may differ between a run and its resumption: where it writes and how it computes, not what.
_RESUMABLE_CHANGES = {"output", "resume", "compile", "gradient_checkpointing", "save_every", "eval_every", "quiet",
                      "device", "batch_size", "grad_accum", "fsdp"}


class FinetuneError(ValueError):
    """A user error (bad argument, unusable output directory, a run that does not fit): one line for the CLI."""


@dataclass
class FinetuneArgs:
    """Everything that defines a fine-tuning run (recorded in run.json and finetune.json)."""
    model: str                       # what posenc.analysis.load_model takes: a directory, .gguf, preset, smollm2
    encoding: str                    # an encoding spec (posenc.specs), e.g. "hope:4096", "prope:0.25", "original"
    output: str                      # the run directory
    gguf_file: str | None = None
    text_file: str | None = None     # a text file or a directory of them (default: the stdlib's sources)
    max_documents: int | None = None
    seq_len: int = 4096
    steps: int = 200
    batch_size: int = 8              # rows per process and micro-step
    grad_accum: int = 1              # micro-steps per optimizer step
    lr: float | None = None          # default: 1e-4 full fine-tuning, 1e-3 LoRA
    min_lr_ratio: float = 0.1        # the cosine ends at min_lr_ratio * lr
    warmup: int = 20                 # linear warmup steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0       # 0: no clipping
    lora: int | None = None          # LoRA rank; None: full fine-tuning
    lora_alpha: float | None = None  # default 2 * rank
    gradient_checkpointing: bool = False
    compile: str | None = None       # a torch.compile backend ("inductor") for each decoder layer, or None
    dtype: str = "bfloat16"          # autocast dtype; "float32": no autocast
    fsdp: bool = False               # shard with FSDP2 (under torchrun) instead of DDP
    attn_implementation: str = "sdpa"
    save_every: int = 100            # checkpoint every K steps (0: never)
    eval_every: int = 0              # held-out loss every K steps (0: before and after training only)
    eval_rows: int = 16              # held-out rows of seq_len tokens
    seed: int = 0
    resume: bool = False
    device: str | None = None        # default: cuda (the process's local rank) when available, else cpu
    quiet: bool = False              # no progress bar

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.lora else 1e-4)

    def check(self):
        """ValueError / TypeError naming the bad argument; returns the parsed encoding spec."""
        for name in ("model", "encoding", "output"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise TypeError(f"{name} must be a non-empty string, got {value!r}")
        positive = ("seq_len", "steps", "batch_size", "grad_accum", "eval_rows")
        for name in positive + ("warmup", "save_every", "eval_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name in positive else 0):
                raise ValueError(f"{name} must be a {'positive' if name in positive else 'non-negative'} integer, "
                                 f"got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (a row predicts its tokens after the first), "
                             f"got {self.seq_len}")
        for name, low in (("lr", 0.0), ("weight_decay", None), ("max_grad_norm", None), ("lora_alpha", 0.0)):
            value = getattr(self, name)
            if value is None and name in ("lr", "lora_alpha"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0 or (low is not None and value <= low):
                raise ValueError(f"{name} must be a {'positive' if low is not None else 'non-negative'} number, "
                                 f"got {value!r}")
        if not isinstance(self.min_lr_ratio, (int, float)) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.lora is not None and (not isinstance(self.lora, int) or isinstance(self.lora, bool) or self.lora <= 0):
            raise ValueError(f"lora must be a positive LoRA rank or None (full fine-tuning), got {self.lora!r}")
        if self.lora_alpha is not None and self.lora is None:
            raise ValueError("lora_alpha is given without lora (a LoRA rank)")
        if self.max_documents is not None and (not isinstance(self.max_documents, int) or self.max_documents <= 0):
            raise ValueError(f"max_documents must be a positive integer or None, got {self.max_documents!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32 (the autocast dtype), got {self.dtype!r}")
        if self.compile is not None and (not isinstance(self.compile, str) or not self.compile):
            raise ValueError(f"compile must be a torch.compile backend name or None, got {self.compile!r}")
        if self.device is not None and torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.text_file is not None and not os.path.exists(self.text_file):
            raise ValueError(f"text_file (--text-file) {self.text_file} does not exist (give a text file or a "
                             "directory of text files)")
        if self.warmup > self.steps:
            raise ValueError(f"warmup ({self.warmup} steps) is longer than the run ({self.steps} steps)")
        return parse_spec(self.encoding)

    def identity(self, world_size: int) -> dict:
        """What makes two runs the same run (resume checks it): everything but where and how it computes."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RESUMABLE_CHANGES}
        d["encoding"] = str(parse_spec(self.encoding))
        d["lr"] = self.learning_rate
        d["global_batch"] = self.batch_size * self.grad_accum * world_size
        return d


# ------------------------------------------------------------------------------------------- small pieces
def lr_factor(step: int, warmup: int, steps: int, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based) over the peak: linear warmup over `warmup` steps,
    then a cosine from 1 down to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_rows(step: int, global_batch: int, n_rows: int, seed: int) -> torch.Tensor:
    """Indices of the training rows of optimizer step `step`: a window of an endless chain of seeded
    permutations of range(n_rows) (epoch e uses seed + e), so any step's rows follow from the step alone."""
    start, end = step * global_batch, (step + 1) * global_batch
    out, epoch = [], start // n_rows
    while epoch * n_rows < end:
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        lo, hi = max(start, epoch * n_rows) - epoch * n_rows, min(end, (epoch + 1) * n_rows) - epoch * n_rows
        out.append(perm[lo:hi])
        epoch += 1
    return torch.cat(out)


def matmul_parameters(model) -> int:
    """Parameters that take part in matrix products per token: all but the input embedding table, plus the
    output projection (counted once, whether or not it is tied to the embedding)."""
    inner = _unwrap(model)
    seen, total = set(), 0
    for p in inner.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    total -= emb.weight.numel()
    if head is not None and head.weight is emb.weight:
        total += head.weight.numel()
    return total


def flops_per_token(config, seq_len: int, matmul_params: int, trainable_params: int | None = None) -> float:
    """Training FLOPs per token: 6 N + 12 L H Q T (PaLM, Chowdhery et al. 2022, app. B; torchtitan), with N the
    matmul parameters, L layers, H query heads, Q head dim, T the row length (attention counted in full, not
    halved for the causal or document masks). With frozen weights (LoRA) the weight-gradient products of the
    frozen ones are not done: 4 N + 2 N_trainable instead of 6 N."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
    dense = 6 * matmul_params if trainable_params is None else 4 * matmul_params + 2 * trainable_params
    return float(dense + attention)


def _unwrap(model):
    """The transformers (or PEFT) model inside DDP."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- processes
class _Processes:
    """The process group (when launched by torchrun with WORLD_SIZE > 1) and this process's device."""

    def __init__(self, device: str | None):
        import torch.distributed as dist
        self.dist = dist
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
        if kind == "cuda" and not torch.cuda.is_available():
            raise FinetuneError("device cuda: no CUDA device is available")
        self.device = torch.device("cuda", local % torch.cuda.device_count()) if kind == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True
        self.distributed = self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            self.dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.dist.all_reduce(t)
        return t.tolist()

    def together(self, stage) -> None:
        """Run stage(); if it raises FinetuneError on any process, raise it on every process (so that none is
        left waiting at a collective)."""
        try:
            stage()
            error = None
        except FinetuneError as e:
            error = str(e)
        if self.distributed:
            flags = [None] * self.world
            self.dist.all_gather_object(flags, error)
            error = next((e for e in flags if e), None)
        if error:
            raise FinetuneError(error)

    def close(self):
        if self.owns_group and self.dist.is_initialized():
            self.dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- output dir
class _Output:
    """The run directory: checked before any long work; what this run wrote is removed again if it fails
    before its first checkpoint, so a failed start leaves nothing behind."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.created_dir = False
        self.written: list[str] = []
        self.checkpointed = False

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def checkpoint_dir(self) -> str:
        return self.file(CHECKPOINTS)

    def latest_checkpoint(self) -> str | None:
        try:
            names = sorted(n for n in os.listdir(self.checkpoint_dir) if n.startswith("step-"))
        except OSError:
            return None
        return os.path.join(self.checkpoint_dir, names[-1]) if names else None

    def check(self, resume: bool) -> None:
        """FinetuneError when the directory cannot take this run (creates nothing; every process)."""
        p = self.path
        if resume:
            if not os.path.isfile(self.file(RUN_NAME)):
                raise FinetuneError(f"--resume: {p} holds no run to resume (no {RUN_NAME})")
            if os.path.isfile(self.file(RECORD_NAME)):
                raise FinetuneError(f"--resume: the run in {p} has finished ({RECORD_NAME} is there)")
            if self.latest_checkpoint() is None:
                raise FinetuneError(f"--resume: {p} has no checkpoint yet; start the run again without --resume "
                                    "in an empty directory")
        elif os.path.isdir(p):
            entries = os.listdir(p)
            if RUN_NAME in entries or CHECKPOINTS in entries:
                raise FinetuneError(f"output directory {p} already holds a run; pass --resume to continue it, "
                                    "or choose another directory")
            if entries:
                raise FinetuneError(f"output directory {p} is not empty; choose a new or empty directory")
        try:
            check_writable_dir(p, "--output")
        except ValueError as e:
            raise FinetuneError(str(e)) from None

    def claim(self) -> None:
        """Create the directory (main process)."""
        try:
            if not os.path.isdir(self.path):
                os.makedirs(self.path)
                self.created_dir = True
        except OSError as e:
            raise FinetuneError(f"--output: cannot create {self.path}: {e.strerror or e}") from None

    def discard(self) -> None:
        """Remove what this run wrote (called when it fails before its first checkpoint)."""
        if self.checkpointed:
            return
        for path in self.written:
            with contextlib.suppress(OSError):
                os.remove(path)
        if self.created_dir:
            shutil.rmtree(self.path, ignore_errors=True)


# ------------------------------------------------------------------------------------------- model + data
def _load(args: FinetuneArgs, spec):
    """(model with the encoding applied, tokenizer or None, description). ModelLoadError / ValueError on bad
    input, before any training. (A GGUF loads as a plain float32 model that save_pretrained takes.)"""
    from . import patch
    from .analysis.loading import load_model
    model, tokenizer, name = load_model(args.model, args.gguf_file, seed=args.seed,
                                        attn_implementation=args.attn_implementation)
    kwargs = spec.patch_kwargs()
    if kwargs is not None:
        patch(model, **kwargs)
    return model, tokenizer, name


def _with_lora(model, args: FinetuneArgs):
    if args.lora is None:
        return model, None
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=args.lora, lora_alpha=args.lora_alpha or 2 * args.lora, lora_dropout=0.0,
                        target_modules="all-linear")
    return get_peft_model(model, config), config


def _build_data(args: FinetuneArgs, tokenizer, vocab_size: int, global_batch: int) -> dict:
    """Training rows (as many tokens as the run reads, or the whole training part) and held-out rows."""
    corpus = load_corpus(args.text_file, max_documents=args.max_documents)
    train_idx, held_idx = split_documents(list(range(len(corpus.documents))), held_out=HELD_OUT, seed=SPLIT_SEED)
    random.Random(args.seed).shuffle(train_idx)
    need = args.steps * global_batch * args.seq_len + args.seq_len

    def encode(order, tokens_wanted):
        docs, total = [], 0
        for _, ids in iter_encoded(corpus, tokenizer, vocab_size, order=order):
            docs.append(ids)
            total += ids.numel()
            if total >= tokens_wanted:
                break
        return docs

    train = pack(encode(train_idx, need), args.seq_len)
    held = pack(encode(held_idx, (args.eval_rows + 1) * args.seq_len), args.seq_len)
    held = {k: v[:args.eval_rows] for k, v in held.items()}
    n = train["input_ids"].shape[0]
    if n < global_batch:
        raise FinetuneError(f"the text gives {n} training rows of {args.seq_len} tokens, fewer than one global batch "
                            f"({global_batch} rows): give more text or a smaller --seq-len / --batch-size")
    describe = corpus.describe()
    describe.update(train_documents=len(train_idx), held_out_documents=len(held_idx), train_rows=n,
                    train_tokens=n * args.seq_len, held_out_rows=held["input_ids"].shape[0],
                    epochs=round(args.steps * global_batch / n, 3),
                    rows_sha256=_digest(train["input_ids"], train["labels"], held["input_ids"]))
    return {"train": train, "held": held, "describe": describe}


def _predicted(labels: torch.Tensor) -> int:
    """Tokens a batch predicts: transformers shifts labels left by one, -100 marks none."""
    return int((labels[:, 1:] != -100).sum())


def packed_logits(model, batch: dict, autocast=contextlib.nullcontext):
    """Logits of packed rows, attention kept inside each document: transformers derives the document mask from
    the restarting position_ids only without an attention mask and a cache, hence use_cache=False."""
    with autocast():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def _loss_sum(model, batch: dict, autocast) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch (fp32)."""
    logits = packed_logits(model, batch, autocast)
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                             ignore_index=-100, reduction="sum")


# ------------------------------------------------------------------------------------------- the run
class _Run:
    def __init__(self, args: FinetuneArgs, spec, procs: _Processes, out: _Output):
        self.args, self.spec, self.procs, self.out = args, spec, procs, out
        self.global_batch = args.batch_size * args.grad_accum * procs.world
        self.dtype = getattr(torch, args.dtype)
        self.log_path = out.file(LOG_NAME)
        self.step = 0  # the step running (for messages)
        self.identity = args.identity(procs.world)  # what resume compares (the data's digests join it)

    # -- setup
    def prepare(self):
        args, procs = self.args, self.procs
        try:
            model, tokenizer, name = _load(args, self.spec)
        except ValueError as e:  # ModelLoadError, unsupported family, bad patch arguments
            raise FinetuneError(str(e)) from None
        self.tokenizer, self.name = tokenizer, name
        self.config = model.config
        try:
            self.data = _build_data(args, tokenizer, model.config.vocab_size, self.global_batch)
        except ValueError as e:  # no text read, too little of it
            raise FinetuneError(str(e)) from None
        self.matmul = matmul_parameters(model)
        torch.manual_seed(args.seed)  # LoRA's initial weights: the same on every process
        model, self.lora_config = _with_lora(model, args)
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        self.n_trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
        if args.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # the newer name (the older one warns)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.to(procs.device)
        if args.compile:
            self._compile(model)
        self.model = self._distribute(model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = procs.device.type == "cuda" and not args.fsdp
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.95),
                                           weight_decay=args.weight_decay, fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, args.warmup, args.steps, args.min_lr_ratio))
        self.flops = flops_per_token(self.config, args.seq_len, self.matmul,
                                     self.n_trainable if self.lora_config else None)

    def _compile(self, model):
        """Compile each decoder layer (the rotary op inside its graph)."""
        base = model.get_base_model() if self.lora_config else model
        for layer in base.model.layers:
            layer.compile(backend=self.args.compile)

    def _distribute(self, model):
        if not self.procs.distributed:
            return model
        if self.args.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            # The mesh on the run's device: fully_shard's default mesh is on CUDA wherever CUDA exists, which
            # fails for a CPU (gloo) run on a machine with fewer GPUs than processes.
            mesh = init_device_mesh(self.procs.device.type, (self.procs.world,))
            base = model.get_base_model() if self.lora_config else model
            for layer in base.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.procs.device.index] if self.procs.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.procs.device.type, dtype=self.dtype)

    # -- state
    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        if self.lora_config is not None:  # the frozen base comes from the model itself again
            model_sd = {k: v for k, v in model_sd.items() if k in self.trainable}
        return {"model": model_sd, "optim": optim_sd}

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.procs.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.procs.device)
        return state

    def save_checkpoint(self, step: int):
        import torch.distributed.checkpoint as dcp
        procs, out = self.procs, self.out
        name = f"step-{step:08d}"
        tmp = os.path.join(out.checkpoint_dir, f".{name}.tmp")
        if procs.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        procs.barrier()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
            dcp.save(self._state(), checkpoint_id=os.path.join(tmp, "state"))
        torch.save(self._rng_state(), os.path.join(tmp, f"rng-{procs.rank}.pt"))
        procs.barrier()
        if procs.main:
            write_json({"step": step, "scheduler": self.scheduler.state_dict(), "world_size": procs.world,
                        "identity": self.identity}, os.path.join(tmp, "trainer.json"))
            final = os.path.join(out.checkpoint_dir, name)
            os.replace(tmp, final)
            out.checkpointed = True
            for old in os.listdir(out.checkpoint_dir):  # keep the newest only
                if old != name:
                    shutil.rmtree(os.path.join(out.checkpoint_dir, old), ignore_errors=True)
        procs.barrier()

    def load_checkpoint(self, path: str) -> int:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        with open(os.path.join(path, "trainer.json")) as f:
            trainer = json.load(f)
        state = self._state()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(state, checkpoint_id=os.path.join(path, "state"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=self.lora_config is None))
        self.scheduler.load_state_dict(trainer["scheduler"])
        rng = os.path.join(path, f"rng-{self.procs.rank}.pt")
        if trainer["world_size"] == self.procs.world and os.path.isfile(rng):
            state = torch.load(rng, weights_only=False)
            torch.set_rng_state(state["torch"])
            random.setstate(state["python"])
            if "cuda" in state and self.procs.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda"], self.procs.device)
        elif self.procs.main:
            print(f"finetune: resuming with {self.procs.world} processes, the checkpoint has "
                  f"{trainer['world_size']}: random states start fresh", file=sys.stderr)
        return int(trainer["step"])

    # -- the loop
    def _micro_batches(self, step: int):
        args, procs = self.args, self.procs
        rows = step_rows(step, self.global_batch, self.data["train"]["input_ids"].shape[0], args.seed)
        train = self.data["train"]
        n_items = _predicted(train["labels"][rows])
        for k in range(args.grad_accum):
            lo = (k * procs.world + procs.rank) * args.batch_size
            pick = rows[lo:lo + args.batch_size]
            yield k, n_items, {key: v[pick].to(procs.device, non_blocking=True) for key, v in train.items()}

    def _no_sync(self, last: bool):
        if last or not self.procs.distributed:
            return contextlib.nullcontext()
        if self.args.fsdp:
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.model.no_sync()

    def train_step(self, step: int) -> dict:
        args, procs = self.args, self.procs
        self.model.train()
        total = torch.zeros((), dtype=torch.float64, device=procs.device)
        n_items = 0
        for k, n_items, batch in self._micro_batches(step):
            last = k == args.grad_accum - 1
            if args.fsdp and procs.distributed and last:
                self.model.set_requires_gradient_sync(True)
            with self._no_sync(last):
                loss = _loss_sum(self.model, batch, self.autocast) / n_items
                # DDP and FSDP average gradients over processes; the loss is already a global mean.
                (loss * procs.world).backward()
            total += loss.detach()
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, norm = procs.sum([float(total), float(norm) / procs.world])
        return {"loss": loss, "lr": lr, "grad_norm": norm, "predicted_tokens": n_items}

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean next-token loss over the held-out rows (split over processes; every process runs as many
        batches, so FSDP's collectives line up)."""
        held, procs, b = self.data["held"], self.procs, self.args.batch_size
        n = held["input_ids"].shape[0]
        if n < procs.world:
            return None
        self.model.eval()
        mine = torch.arange(procs.rank, n - n % procs.world, procs.world)
        loss_sum, count = 0.0, 0
        for i in range(0, mine.numel(), b):
            pick = mine[i:i + b]
            batch = {k: v[pick].to(procs.device) for k, v in held.items()}
            loss_sum += float(_loss_sum(self.model, batch, self.autocast))
            count += _predicted(held["labels"][pick])
        loss_sum, count = procs.sum([loss_sum, count])
        self.model.train()
        return {"eval_loss": loss_sum / count, "eval_ppl": math.exp(min(loss_sum / count, 700)),
                "eval_tokens": int(count)}

    def log(self, entry: dict):
        if self.procs.main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def _trim_log(self, step: int):
        """On resume: keep the log lines of steps up to the checkpoint (the rest are redone)."""
        if not self.procs.main or not os.path.isfile(self.log_path):
            return
        with open(self.log_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self.log_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.log_path)

    def run(self, stop_after: int | None) -> dict:
        args, procs, out = self.args, self.procs, self.out
        start = 0
        if args.resume:
            start = self.load_checkpoint(out.latest_checkpoint())
            self._trim_log(start)
            history = []
            if procs.main:
                with open(self.log_path) as f:
                    history = [json.loads(line) for line in f if line.strip()]
        else:
            history = []
            if procs.main:
                open(self.log_path, "w").close()
                out.written.append(self.log_path)
            first = self.evaluate()
            if first is not None:
                history.append({"step": 0, **first})
                self.log(history[-1])
        end = args.steps if stop_after is None else min(args.steps, stop_after)
        progress = Progress("finetune", args.steps, start=start, quiet=not procs.main or args.quiet)
        tokens_per_step = self.global_batch * args.seq_len
        for step in range(start, end):
            if procs.device.type == "cuda":
                torch.cuda.synchronize(procs.device)
            t0 = time.perf_counter()
            self.step = step
            entry = self.train_step(step)
            dt = time.perf_counter() - t0  # .item() in train_step has synchronised
            entry = {"step": step + 1, **entry, "tokens_per_s": tokens_per_step / dt, "step_s": dt}
            history.append(entry)
            self.log(entry)
            progress.update(step + 1, f"loss {entry['loss']:.4f} lr {entry['lr']:.2e} "
                                      f"{entry['tokens_per_s']:,.0f} tok/s")
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                result = self.evaluate()
                if result is not None:
                    history.append({"step": step + 1, **result})
                    self.log(history[-1])
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                self.save_checkpoint(step + 1)
        progress.close()
        if end < args.steps:
            return {"stopped_at": end, "history": history}
        final = self.evaluate()
        if final is not None:
            history.append({"step": args.steps, **final})
            self.log(history[-1])
        return self.finish(history)

    # -- the result
    def _full_model(self):
        """The trained model on the main process (None elsewhere), as a plain (or PEFT) module on its device
        (under FSDP: gathered to the CPU into a fresh copy)."""
        if not (self.procs.distributed and self.args.fsdp):
            return _unwrap(self.model) if self.procs.main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.procs.main:
            return None
        model, _, _ = _load(self.args, self.spec)
        model, _ = _with_lora(model, self.args)
        model.load_state_dict(state)
        return model

    def finish(self, history: list) -> dict:
        args, procs, out = self.args, self.procs, self.out
        model = self._full_model()
        train = [h for h in history if "loss" in h]
        evals = [h for h in history if "eval_loss" in h]
        speeds = sorted(h["tokens_per_s"] for h in train[min(len(train) - 1, max(1, len(train) // 10)):])
        tokens_per_s = speeds[len(speeds) // 2] if speeds else None
        record = {
            "posenc_version": _version(), "git_commit": _git_commit(), "command": sys.argv,
            "args": dataclasses.asdict(args), "encoding": str(self.spec), "lr": args.learning_rate,
            "global_batch": self.global_batch, "world_size": procs.world,
            "parallel": "fsdp2" if args.fsdp and procs.distributed else "ddp" if procs.distributed else "none",
            "device": torch.cuda.get_device_name(procs.device) if procs.device.type == "cuda" else "cpu",
            "model": {"source": args.model, "description": self.name, "model_type": self.config.model_type,
                      "parameters": self.n_params, "trainable_parameters": self.n_trainable,
                      "matmul_parameters": self.matmul, "rope_parameters": self.config.rope_parameters,
                      "adapter": "adapter" if self.lora_config is not None else None},
            "data": self.data["describe"],
            "final": {"steps": args.steps, "train_loss": train[-1]["loss"] if train else None,
                      "train_loss_last10": sum(h["loss"] for h in train[-10:]) / len(train[-10:]) if train else None,
                      "eval_loss_before": evals[0]["eval_loss"] if evals and evals[0]["step"] == 0 else None,
                      "eval_loss": evals[-1]["eval_loss"] if evals else None},
            "speed": {"tokens_per_s": tokens_per_s, "flops_per_token": self.flops,
                      "flops_formula": "6 N + 12 L H Q T per token (N matmul parameters; LoRA: 4 N + 2 N_trainable)",
                      "mfu_h200": (tokens_per_s * self.flops / (H200_BF16_PEAK_FLOPS * procs.world)
                                   if tokens_per_s and procs.device.type == "cuda" else None)},
            "rotary_backend": _rotary_backend(procs.device),
            "peak_memory_gib": (torch.cuda.max_memory_allocated(procs.device) / 2**30
                                if procs.device.type == "cuda" else None),
            "versions": _versions(),
        }
        if procs.main:
            self._save_model(model)
            write_json(record, out.file(RECORD_NAME))
            shutil.rmtree(out.checkpoint_dir, ignore_errors=True)  # a finished run is not resumed
            print(f"finetune: wrote {out.path} (train loss {record['final']['train_loss']}, held-out loss "
                  f"{record['final']['eval_loss']})", file=sys.stderr)
        procs.barrier()
        return record

    def _save_model(self, model):
        out = self.out
        tmp = out.file(".model.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = model.to("cpu")
        if self.lora_config is not None:
            model.save_pretrained(os.path.join(tmp, "adapter"))
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):  # each file replaced atomically; finetune.json comes last
            target = out.file(name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
        os.rmdir(tmp)


def _rotary_backend(device) -> str:
    from .ops import backend
    return backend(device)


def _version() -> str:
    from . import __version__
    return __version__


def _versions() -> dict:
    import transformers
    found = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    try:
        import peft
        found["peft"] = peft.__version__
    except ImportError:
        pass
    return found


def finetune(args: FinetuneArgs, *, stop_after: int | None = None) -> dict:
    """Fine-tune args.model with args.encoding; returns what finetune.json records. stop_after: end after that
    many steps (a checkpoint is written then if save_every divides it), as an interrupted run would; the
    result is then {"stopped_at": step, "history": [...]} and no model is saved.
    FinetuneError on user errors (bad arguments, output directory, model, data, out of memory); a run that
    fails before its first checkpoint leaves nothing in the output directory."""
    try:
        spec = args.check()
    except (TypeError, ValueError) as e:
        raise FinetuneError(str(e)) from None
    procs = _Processes(args.device)
    out = _Output(args.output)
    run = _Run(args, spec, procs, out)

    def check_output():
        out.check(args.resume)
        if args.resume:  # the arguments first (cheap); the data's digests once it is read
            _check_same_run(out, run.identity, set(run.identity))

    def prepare():
        run.prepare()
        run.identity.update(data_sha256=run.data["describe"]["sha256"], rows_sha256=run.data["describe"]["rows_sha256"])
        if args.resume:
            _check_same_run(out, run.identity)

    def claim():
        if procs.main and not args.resume:
            out.claim()
            try:
                write_json({"identity": run.identity, "args": dataclasses.asdict(args)}, out.file(RUN_NAME))
            except OSError as e:
                raise FinetuneError(f"cannot write {out.file(RUN_NAME)}: {e.strerror or e}") from None
            out.written.append(out.file(RUN_NAME))

    try:
        for stage in (check_output, prepare, claim):
            procs.together(stage)
        try:
            return run.run(stop_after)
        except torch.OutOfMemoryError:
            raise FinetuneError(
                f"out of memory at step {run.step + 1} with {args.batch_size} rows x {args.seq_len} tokens per "
                f"process and micro-step: try a smaller --batch-size (a larger --grad-accum keeps the global batch), "
                f"--gradient-checkpointing, or a shorter --seq-len") from None
    except BaseException:
        if procs.main and not args.resume:
            out.discard()
        raise
    finally:
        procs.close()


def _check_same_run(out: _Output, identity: dict, keys: set | None = None) -> None:
    try:
        with open(out.file(RUN_NAME)) as f:
            recorded = json.load(f)["identity"]
    except (OSError, ValueError, KeyError) as e:
        raise FinetuneError(f"--resume: cannot read {out.file(RUN_NAME)}: {e}") from None
    keys = keys if keys is not None else set(recorded) | set(identity)
    diffs = [k for k in sorted(keys) if recorded.get(k) != identity.get(k)]
    if diffs:
        shown = ", ".join(f"{k}: {recorded.get(k)!r} there, {identity.get(k)!r} now" for k in diffs[:4])
        raise FinetuneError(f"--resume: {out.path} holds a different run ({shown}{', ...' if len(diffs) > 4 else ''})")
