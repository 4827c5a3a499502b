"""The training loop: LoRA, full fine-tuning and prompt tuning in plain torch.

One function, :func:`train`, runs a whole job: data preparation, model loading, the
evaluation before, the optimizer loop with warmup and schedule, checkpoints, the
evaluation after and the export. It reports through ``on_event`` (dataclasses from
:mod:`trainer.events`), polls ``should_cancel`` between optimizer steps and can resume
from a checkpoint to the same result as an uninterrupted run. Under torchrun's
environment (or ``nproc`` ranks of a worker job) it trains data-parallel across the
ranks (:mod:`trainer.distributed`) to the gradients of one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from common.models import ModelSource, load_model, load_tokenizer, resolve_device, resolve_model
from trainer import checkpoint as ckpt
from trainer.config import TrainConfig
from trainer.data import (
    IGNORE_INDEX,
    DatasetSource,
    PreparedData,
    TokenizedExample,
    collate,
    prepare_data,
)
from trainer.distributed import (
    PeerStopped,
    Ranks,
    close_group,
    copy_from_rank0,
    from_rank0,
    gather_named,
    init_group,
    of_rank,
    sum_across,
    sum_gradients,
)
from trainer.events import (
    CheckpointEvent,
    DoneEvent,
    EvalEvent,
    LogEvent,
    MetricsEvent,
    PhaseEvent,
    TrainEvent,
)

logger = logging.getLogger(__name__)

ARTIFACT_DIR = "artifact"
CHECKPOINT_DIR = "checkpoints"

# LoRA targets per architecture (config.model_type): every linear layer of attention and
# MLP, which QLoRA (Dettmers et al. 2023) found needed to match full fine-tuning.
LORA_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "olmo"),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


class TrainingCancelled(Exception):
    """Raised by :func:`train` when ``should_cancel`` returned True; nothing is exported."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training cancelled after step {step}")
        self.step = step


def lora_target_modules(model_type: str, requested: Sequence[str] = ()) -> list[str] | str:
    """The requested modules, else the table's entry, else peft's "all-linear"."""
    if requested:
        return list(requested)
    return list(LORA_TARGETS.get(model_type, [])) or "all-linear"


def lr_factor(step: int, total_steps: int, warmup_steps: int, scheduler: str) -> float:
    """Multiplier of the peak rate for 0-based optimizer ``step``: linear warmup reaching
    the peak on the last warmup step, then linear/cosine decay toward 0, or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


@dataclasses.dataclass
class _Plan:
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def _plan(config: TrainConfig, n_train: int) -> _Plan:
    micro = math.ceil(n_train / config.batch_size)
    per_epoch = math.ceil(micro / config.gradient_accumulation_steps)
    total = per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    return _Plan(micro, per_epoch, total, math.ceil(config.warmup_ratio * total))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Example order of one epoch: a function of (seed, epoch) only, so a resumed run
    sees the same order without saving it."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def _step_micro_batches(
    data: Sequence[TokenizedExample], config: TrainConfig, plan: _Plan, step: int
) -> list[list[TokenizedExample]]:
    """The micro-batches of 0-based optimizer ``step``."""
    epoch, in_epoch = divmod(step, plan.steps_per_epoch)
    order = epoch_order(len(data), config.seed, epoch)
    first = in_epoch * config.gradient_accumulation_steps
    last = min(first + config.gradient_accumulation_steps, plan.micro_batches_per_epoch)
    bs = config.batch_size
    return [[data[i] for i in order[m * bs : (m + 1) * bs]] for m in range(first, last)]


class _Precision:
    """Autocast (bf16, else fp16 with loss scaling) on CUDA; exact float32 elsewhere."""

    def __init__(self, device: str) -> None:
        self.device_type = torch.device(device).type
        self.dtype: torch.dtype | None = None
        if self.device_type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def _accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count."""
    labels = batch["labels"]
    width = labels.shape[1]
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(labelled[0]) if len(labelled) else width - 1
    # Positions before the first label of the batch (the shared part of the prompts)
    # need no logits: skipping them saves the vocabulary projection and its backward,
    # a fifth of a small model's compute. The kept positions are the last ones, which
    # also holds when prompt tuning prepends virtual tokens.
    keep = min(width, width - first + 1)
    kwargs: dict[str, Any] = {}
    if keep < width and _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    else:
        keep = width
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    logits = out.logits[:, -keep:, :]
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, width - keep + 1 :]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: Any,
    data: Sequence[TokenizedExample],
    *,
    batch_size: int,
    pad_token_id: int,
    device: str,
    precision: _Precision | None = None,
    ranks: Ranks | None = None,
) -> tuple[float, int]:
    """Mean token cross-entropy over ``data`` (learned tokens only) and the token count.
    With ``ranks`` each rank evaluates its share and the sums are combined."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    precision = precision or _Precision(device)
    ranks = ranks or Ranks()
    if ranks.distributed:
        data = ranks.shard(data)
    try:
        for i in range(0, len(data), batch_size):
            batch = _to(collate(data[i : i + batch_size], pad_token_id), device)
            with precision.autocast():
                loss, n = _token_loss_sum(model, batch)
            total += float(loss)
            count += n
    finally:
        model.train(was_training)
    if ranks.distributed:
        total, summed = sum_across([total, count], device)
        count = int(summed)
    return (total / count if count else float("nan")), count


def _eval_event(stage: str, loss: float, tokens: int, step: int) -> EvalEvent:
    ppl = math.exp(loss) if loss < 700 else float("inf")
    return EvalEvent(stage=stage, eval_loss=loss, perplexity=ppl, step=step, eval_tokens=tokens)


def _apply_method(model: Any, config: TrainConfig) -> Any:
    """Wraps the model for the method and leaves exactly the trained weights trainable."""
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if config.method == "bottleneck":
        from common import bottleneck

        for p in model.parameters():
            p.requires_grad_(False)
        spec = bottleneck.spec_for(model, config.bottleneck_size, config.bottleneck_placement)
        bottleneck.attach(model, bottleneck.BottleneckSet(spec))  # trainable: only these
        return model
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    if config.method == "lora":
        targets = lora_target_modules(model.config.model_type, config.lora_target_modules)
        peft_config: Any = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft accepts floats
            lora_dropout=config.lora_dropout,
            target_modules=targets,
        )
    else:
        # Initialising from real token embeddings trains far faster than N(0, 1) noise,
        # whose scale is far from the embeddings' (Lester et al. 2021, section 3.2).
        peft_config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=config.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
        )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        # peft names the missing module; surface it as a bad hyperparameter.
        raise ValueError(f"lora_target_modules: {exc}") from exc


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _export(
    model: Any, tokenizer: Any, config: TrainConfig, source: ModelSource, folder: Path
) -> None:
    """Writes the artifact atomically: PEFT format for adapters, an HF folder for full."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if config.method == "full":
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        elif config.method == "bottleneck":
            from common import bottleneck

            bottleneck.save(model.bottleneck, tmp, source.name)
        else:
            # save_embedding_layers=False: embeddings never train here, and "auto" makes
            # peft look the base model up on the hub.
            model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
            (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
            # Clients know the base model by its name, not this machine's cache path.
            config_file = tmp / "adapter_config.json"
            adapter_config = json.loads(config_file.read_text())
            adapter_config["base_model_name_or_path"] = source.name
            config_file.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rank_seed(seed: int, rank: int) -> int:
    return seed * 1_000_003 + rank


def _model_dtype(requested: str, method: str, device: str) -> str:
    """Weights dtype: frozen LoRA bases can live in half precision on CUDA (peft keeps the
    adapter in float32); anything that trains keeps float32 master weights."""
    if requested != "auto":
        return requested
    if method == "lora" and device.startswith("cuda"):
        return "auto"  # common.models: bf16 (or fp16) on CUDA
    return "float32"


def train(
    config: TrainConfig,
    base_model: ModelSource | str | None,
    dataset: DatasetSource | PreparedData,
    output_dir: str | Path,
    *,
    on_event: Callable[[TrainEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    resume_from: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    before_write: Callable[[], None] | None = None,
    ranks: Ranks | None = None,
) -> DoneEvent:
    """Runs a fine-tuning job and returns its DoneEvent (also sent to ``on_event``).

    ``dataset`` is a JSONL path, JsonlText, a list of row dicts, or prepared data. The
    artifact is written to ``output_dir/artifact`` (PEFT folder, or HF model folder for
    ``full``) and checkpoints to ``output_dir/checkpoints/step-N``. ``resume_from`` is a
    checkpoint folder of a run with the same config and data. Raises DatasetError /
    ValueError for bad input and TrainingCancelled when ``should_cancel()`` turns True.
    ``before_write`` is called before each checkpoint and before the export; whatever it
    raises ends the run (the job process fences writes with its lease there).

    ``ranks`` (default: torchrun's environment, else one process) makes this one rank of
    a data-parallel run: each micro-batch is split across the ranks (``batch_size`` must
    be a multiple of the world size), only rank 0 calls ``on_event``, ``should_cancel``
    and ``before_write`` and writes files, and the others raise PeerStopped when rank 0
    stops with an error.
    """
    ranks = ranks or Ranks.from_env()
    if config.batch_size % ranks.world_size:
        raise ValueError(
            f"batch_size {config.batch_size} must be a multiple of the {ranks.world_size} "
            "ranks (each rank takes an equal share of every micro-batch)"
        )
    dev = init_group(ranks, resolve_device(device))
    try:
        return _train(
            config,
            base_model,
            dataset,
            Path(output_dir),
            on_event=on_event if ranks.is_main else None,
            should_cancel=should_cancel if ranks.is_main else None,
            resume_from=resume_from,
            dev=dev,
            dtype=dtype,
            before_write=before_write,
            ranks=ranks,
        )
    finally:
        if ranks.distributed:
            close_group()


def _stop_requested(cancelled: Callable[[], bool], ranks: Ranks, dev: str, step: int) -> bool:
    """Rank 0's answer to ``cancelled()`` on every rank; rank 0's exception is re-raised
    there and ends the other ranks with PeerStopped, so no rank waits on a gone one."""
    code, error = 0, None
    if ranks.is_main:
        try:
            code = 1 if cancelled() else 0
        except Exception as exc:
            code, error = 2, exc
    if ranks.distributed:
        code = from_rank0(code, dev)
    if error is not None:
        raise error
    if code == 2:
        raise PeerStopped(f"rank 0 stopped before step {step + 1}")
    return code == 1


def _train(
    config: TrainConfig,
    base_model: ModelSource | str | None,
    dataset: DatasetSource | PreparedData,
    output_dir: Path,
    *,
    on_event: Callable[[TrainEvent], None] | None,
    should_cancel: Callable[[], bool] | None,
    resume_from: str | Path | None,
    dev: str,
    dtype: str,
    before_write: Callable[[], None] | None,
    ranks: Ranks,
) -> DoneEvent:
    started = time.monotonic()
    emit = on_event or (lambda event: None)
    cancelled = should_cancel or (lambda: False)
    fence = before_write or (lambda: None)
    source = base_model if isinstance(base_model, ModelSource) else resolve_model(base_model)
    precision = _Precision(dev)

    emit(PhaseEvent("data", "preparing data"))
    tokenizer = load_tokenizer(source)
    if isinstance(dataset, PreparedData):
        data = dataset
    else:
        data = prepare_data(
            dataset,
            tokenizer,
            max_seq_length=config.max_seq_length,
            eval_fraction=config.eval_fraction,
            seed=config.seed,
            drop_invalid=config.drop_invalid,
        )
    emit(LogEvent(f"data: {data.stats.summary()}"))
    emit(LogEvent(f"data: {data.stats.balance_summary()}"))
    plan = _plan(config, len(data.train))
    fingerprint = data.fingerprint()

    resume = ckpt.load_checkpoint(resume_from) if resume_from else None
    if resume is not None:
        saved = resume["state"]
        if saved.get("config") != config.to_dict():
            raise ValueError(
                f"checkpoint {resume_from} was made with different hyperparameters: "
                f"{saved.get('config')} != {config.to_dict()}"
            )
        if saved.get("data_fingerprint") != fingerprint:
            raise ValueError(f"checkpoint {resume_from} was made with a different dataset")

    emit(PhaseEvent("load_model", f"loading {source.name} on {dev}"))
    torch.manual_seed(config.seed)
    model, _ = load_model(source, dtype=_model_dtype(dtype, config.method, dev), device=dev)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    eval_before: EvalEvent | None = None
    if resume is not None:
        if resume["state"].get("eval_before"):
            eval_before = EvalEvent(**resume["state"]["eval_before"])
    elif data.eval:
        emit(PhaseEvent("evaluate", "evaluating the base model"))
        loss, tokens = evaluate(
            model,
            data.eval,
            batch_size=config.batch_size // ranks.world_size,
            pad_token_id=pad_id,
            device=dev,
            precision=precision,
            ranks=ranks,
        )
        eval_before = _eval_event("before", loss, tokens, 0)
        emit(eval_before)

    # Seed again so adapter initialisation does not depend on whether eval ran.
    torch.manual_seed(config.seed)
    model = _apply_method(model, config)
    model.to(dev)
    model.train()
    params = _trainable(model)
    if ranks.distributed:
        emit(
            LogEvent(
                f"data-parallel on {ranks.world_size} ranks: "
                f"{config.batch_size // ranks.world_size} examples per rank per micro-batch"
            )
        )
        copy_from_rank0(params.values())
        if not ranks.is_main:
            # Rank 0 keeps the single-process stream; the others draw their own dropout.
            torch.manual_seed(_rank_seed(config.seed, ranks.rank))
    n_trainable = sum(p.numel() for p in params.values())
    n_total = sum(p.numel() for p in model.parameters())
    emit(
        LogEvent(
            f"{config.method}: {n_trainable:,} trainable parameters of {n_total:,}; "
            f"{plan.total_steps} steps ({plan.steps_per_epoch}/epoch)"
        )
    )
    # No weight decay on biases and norms (standard AdamW practice since BERT).
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    assert config.learning_rate is not None  # set by TrainConfig.__post_init__
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)

    step = 0
    if resume is not None:
        missing = set(params) - set(resume["trainable"])
        if missing:
            raise ValueError(f"checkpoint {resume_from} lacks weights: {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(resume["trainable"][name].to(p.device, p.dtype))
        optimizer.load_state_dict(resume["optimizer"])
        state = resume["state"]
        step = int(state["step"])
        if precision.scaler is not None and state.get("grad_scaler"):
            precision.scaler.load_state_dict(state["grad_scaler"])
        rng = of_rank(resume["rng"], ranks.rank)
        if rng:
            ckpt.set_rng_state(rng)
        else:  # saved by fewer ranks: this one starts a fresh stream
            torch.manual_seed(_rank_seed(config.seed, ranks.rank) + step)
        emit(LogEvent(f"resumed from {resume_from} at step {step}/{plan.total_steps}"))

    checkpoint_root = output_dir / CHECKPOINT_DIR
    last_loss = float("nan")
    emit(PhaseEvent("train", f"training {plan.total_steps} steps"))
    while step < plan.total_steps:
        if _stop_requested(cancelled, ranks, dev, step):
            emit(LogEvent(f"cancelled before step {step + 1}"))
            raise TrainingCancelled(step)
        t0 = time.perf_counter()
        lr = config.learning_rate * lr_factor(
            step, plan.total_steps, plan.warmup_steps, config.lr_scheduler
        )
        for g in optimizer.param_groups:
            g["lr"] = lr
        # This rank's share of each of the step's micro-batches (all of it on one rank);
        # a share can be empty in a short last micro-batch.
        shares = [ranks.shard(mb) for mb in _step_micro_batches(data.train, config, plan, step)]
        micro = [_to(collate(share, pad_id), dev) for share in shares if share]
        # Normalise by the step's learned tokens (of every rank), not per micro-batch, so
        # accumulation and ranks give the same gradient as one big batch.
        n_learned = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
        if ranks.distributed:
            n_learned = int(sum_across([n_learned], dev)[0])
        total_loss = 0.0
        for batch in micro:
            with precision.autocast():
                loss_sum, _ = _token_loss_sum(model, batch)
            step_loss = loss_sum / max(1, n_learned)
            if precision.scaler is not None:
                precision.scaler.scale(step_loss).backward()
            else:
                step_loss.backward()
            total_loss += float(loss_sum.detach())
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        if ranks.distributed:
            sum_gradients(params.values())
            total_loss, summed_tokens = sum_across([total_loss, tokens], dev)
            tokens = int(summed_tokens)
        if precision.scaler is not None:
            precision.scaler.unscale_(optimizer)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        if precision.scaler is not None:
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = total_loss / max(1, n_learned)
        if not math.isfinite(last_loss):
            raise FloatingPointError(
                f"training diverged at step {step} (loss {last_loss}); lower the learning_rate"
            )
        elapsed = time.perf_counter() - t0
        emit(
            MetricsEvent(
                step=step,
                total_steps=plan.total_steps,
                epoch=step / plan.steps_per_epoch,
                loss=last_loss,
                learning_rate=lr,
                tokens_per_second=tokens / elapsed if elapsed > 0 else 0.0,
            )
        )
        every = config.checkpoint_every_steps or plan.steps_per_epoch
        if step % every == 0 and step < plan.total_steps:
            # Every rank's generator, so a resumed run draws the same dropout on each.
            rngs = gather_named(ckpt.rng_state(), ranks, dev) if ranks.distributed else None
            if ranks.is_main:
                fence()
                path = ckpt.save_checkpoint(
                    checkpoint_root,
                    step,
                    trainable=params,
                    optimizer=optimizer,
                    rng=rngs,
                    state={
                        "config": config.to_dict(),
                        "data_fingerprint": fingerprint,
                        "eval_before": dataclasses.asdict(eval_before) if eval_before else None,
                        "grad_scaler": precision.scaler.state_dict() if precision.scaler else None,
                        "train_loss": last_loss,
                        "world_size": ranks.world_size,
                    },
                )
                emit(CheckpointEvent(step=step, path=str(path)))

    eval_after: EvalEvent | None = None
    if data.eval:
        emit(PhaseEvent("evaluate", "evaluating the trained model"))
        loss, tokens = evaluate(
            model,
            data.eval,
            batch_size=config.batch_size // ranks.world_size,
            pad_token_id=pad_id,
            device=dev,
            precision=precision,
            ranks=ranks,
        )
        eval_after = _eval_event("after", loss, tokens, step)
        emit(eval_after)

    emit(PhaseEvent("export", "saving the artifact"))
    artifact = output_dir / ARTIFACT_DIR
    if ranks.is_main:
        fence()
        _export(model, tokenizer, config, source, artifact)
    seconds = time.monotonic() - started
    metrics: dict[str, Any] = {"steps": step, "train_loss": last_loss, "train_seconds": seconds}
    for ev in (eval_before, eval_after):
        if ev is not None:
            metrics[f"eval_loss_{ev.stage}"] = ev.eval_loss
            metrics[f"perplexity_{ev.stage}"] = ev.perplexity
    done = DoneEvent(
        artifact_dir=str(artifact),
        steps=step,
        train_loss=last_loss,
        eval_before=eval_before,
        eval_after=eval_after,
        seconds=seconds,
        metadata={
            "base_model": source.name,
            "method": config.method,
            "hyperparameters": config.to_dict(),
            "metrics": metrics,
            "data": dataclasses.asdict(data.stats),
            "data_fingerprint": fingerprint,
            "trainable_parameters": n_trainable,
        },
    )
    emit(done)
    return done
