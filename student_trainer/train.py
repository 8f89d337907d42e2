"""The training run: set-up, then the loop, in which teacher rows for the next micro-batches are in flight
while this step trains."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from student_trainer.checkpoint import (
    AUTO,
    CHECKPOINTS_DIR,
    LoraExport,
    checkpoint_tag,
    export_pretrained,
    load_checkpoint,
    resume_point,
    save_checkpoint,
)
from student_trainer.config import TrainerConfig, parse_args
from student_trainer.data import DataError, DataSource, Example, ShardedBatches, StreamingBatches, load_examples
from student_trainer.data.sources import split_off_eval, stream_for_rank
from student_trainer.distributed import init_distributed
from student_trainer.evaluate import sharded_eval
from student_trainer.logs import RunLog, quiet_upstream_warnings
from student_trainer.lora import lora_config, with_lora
from student_trainer.modeling import RowLogitsLM
from student_trainer.preemption import PREEMPTED_EXIT_CODE, Preempted, StopSignal
from student_trainer.rollout import (
    OnPolicy,
    TeacherGenerator,
    generated_step,
    sampling_for,
    stop_ids,
    teacher_generator,
)
from student_trainer.rollouts import open_rollout_engine
from student_trainer.schedule import step_source
from student_trainer.step import LogWindow, NonFiniteLossError, train_step
from student_trainer.teacher import LocalTeacher, Teacher, TeacherError, TeacherOutageError, open_teacher
from student_trainer.teacher.cache import open_cached_teacher
from student_trainer.teacher.feed import TeacherFeed
from student_trainer.teacher.outage import await_step_rows

logger = logging.getLogger("student_trainer")


def train(config: TrainerConfig, stop: StopSignal | None = None) -> dict[str, float]:
    """Set up (distributed, logging, teacher handshake, DeepSpeed engine, data, resume), then :func:`loop`.

    ``stop`` (installed before anything slow) ends the run with a checkpoint on SIGTERM: :class:`Preempted`.
    """
    stop = stop or StopSignal()
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # a rank waiting out a teacher outage holds the others in a collective: their timeout must outlast the wait
    collective_timeout = timedelta(seconds=config.teacher_wait_timeout + 2 * config.teacher_timeout + 600)
    init_distributed(collective_timeout)
    rank = dist.get_rank()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per teacher request is noise
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        logger.info("flags: %s", config.to_dict())

    tokenizer = AutoTokenizer.from_pretrained(config.model_name_or_path)
    vocab = int(AutoConfig.from_pretrained(config.model_name_or_path).vocab_size)

    # refuses a teacher of another tokenizer before weights load; --teacher_cache puts the cache in front of it
    def interrupted() -> bool:  # a SIGTERM ends a wait for the teacher: the run checkpoints and exits instead
        return stop.requested

    teacher: Teacher = (
        open_cached_teacher(config, tokenizer, vocab, lambda: open_teacher(config, tokenizer, vocab, interrupted))
        if config.teacher_cache is not None
        else open_teacher(config, tokenizer, vocab, interrupted)
    )
    generator = teacher_generator(config, teacher)  # --seq_kd: in process, or through the service
    lora = None
    if config.lora_r:
        lora_cfg = lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules_list)
        lora = LoraExport(config.model_name_or_path, lora_cfg, merged=config.export == "merged")
    on_policy: OnPolicy | None = None
    try:
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32)
        if lora is not None:
            model = with_lora(model, lora.config)
        student = RowLogitsLM(model, fused=config.fused_loss)
        trainable = [p for p in student.parameters() if p.requires_grad]  # a LoRA student: the adapters only
        n_trainable, n_params = sum(p.numel() for p in trainable), sum(p.numel() for p in student.parameters())
        engine, _, _, _ = deepspeed.initialize(model=student, model_parameters=trainable, config=config.ds_config)
        if isinstance(teacher, LocalTeacher):
            teacher.load(engine.device, torch.bfloat16 if config.bf16 else torch.float32)
        if config.lmbda > 0:  # after deepspeed.initialize: a colocated vLLM engine joins torch.distributed
            rollouts = open_rollout_engine(
                config.rollout_engine,
                engine,
                config.model_name_or_path,
                max_model_len=min(config.max_length, engine.module.model.config.max_position_embeddings),
                seed=config.seed,
                kv_cache_bytes=int(config.rollout_kv_cache_gib * 2**30),
                dtype="bfloat16" if config.bf16 else "float32",
            )
            sampling = sampling_for(config, stop_ids(engine.module.model, tokenizer), tokenizer.pad_token_id)
            on_policy = OnPolicy(config, engine, rollouts, teacher, sampling)
        batches, eval_examples = load_data(config, tokenizer, engine.train_micro_batch_size_per_gpu())
        start_step = 0
        resume = agreed_resume_point(config.resume_from_checkpoint, out_dir)
        if resume is not None:
            start_step, data_state = load_checkpoint(engine, *resume)
            batches.load_state_dict(data_state)
        elif config.resume_from_checkpoint == AUTO and rank == 0:
            logger.info("--resume_from_checkpoint auto: no complete checkpoint in %s, starting fresh", out_dir)
        if start_step >= config.max_steps:
            raise ValueError(
                f"--resume_from_checkpoint is at step {start_step}, not before --max_steps {config.max_steps}"
            )
        if rank == 0:
            logger.info(
                "student %s; %d ranks x micro-batch %d x accumulation %d, ZeRO stage %d, steps %d..%d",
                config.model_name_or_path, dist.get_world_size(), engine.train_micro_batch_size_per_gpu(),
                engine.gradient_accumulation_steps(), engine.zero_optimization_stage(), start_step + 1,
                config.max_steps,
            )  # fmt: skip
            logger.info(
                "loss %s; %s",
                "fused with the output layer (--fused_loss)" if config.fused_loss else "through the logits",
                f"{n_trainable:,} of {n_params:,} parameters trained"
                + ("" if lora is None else f" (LoRA r={config.lora_r} on {config.lora_target_modules})"),
            )
        summary = loop(
            config, engine, teacher, tokenizer, batches, eval_examples, start_step, stop, generator, on_policy
        )
    except BaseException:
        if on_policy is not None:
            on_policy.close()
        raise
    finally:
        if generator is not None and generator is not teacher:
            generator.close()
        teacher.close()
    try:
        if not config.no_export:
            export_pretrained(engine, tokenizer, out_dir / "final", lora)
        dist.barrier()
    finally:
        if on_policy is not None:  # last: a vLLM engine's shutdown destroys the torch.distributed process group
            on_policy.close()
    return summary


def agreed_resume_point(spec: str | None, out_dir: Path) -> tuple[Path, str] | None:
    """Rank 0's reading of ``--resume_from_checkpoint`` for every rank: with ``auto``, ranks reading the
    checkpoints directory each for themselves could see it differently (a network filesystem's caches)."""
    answer: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            answer[0] = resume_point(spec, out_dir)
        except FileNotFoundError as exc:  # gone since the flags were checked: every rank stops, not rank 0 alone
            answer[0] = f"--resume_from_checkpoint: {exc}"
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], str):
        raise FileNotFoundError(answer[0])
    return answer[0]


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 first (it encodes the dataset into the ``datasets`` cache), then the others (they read the cache)."""
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if dist.get_rank() == 0:
            dist.barrier()


def load_data(
    config: TrainerConfig, tokenizer: Any, micro_batch: int
) -> tuple[ShardedBatches | StreamingBatches, Sequence[Example] | None]:
    """This rank's training micro-batches and the held-out examples, checked and counted before step 1."""
    rank, world, pad_id = dist.get_rank(), dist.get_world_size(), tokenizer.pad_token_id
    source = DataSource(config.dataset, config.dataset_split, config.streaming)
    eval_source = None if config.eval_dataset is None else DataSource(config.eval_dataset, config.eval_split)
    options = {"drop_invalid": config.drop_invalid_rows, "num_proc": config.dataset_num_proc}
    with main_process_first():
        if rank != 0:
            import datasets

            datasets.disable_progress_bars()
        eval_examples = None
        if config.streaming:
            stream = stream_for_rank(source, tokenizer, config.data_spec, rank, world)
            batches: ShardedBatches | StreamingBatches = StreamingBatches(
                stream, micro_batch, pad_id, config.dataset, config.drop_invalid_rows
            )
            if rank == 0:
                logger.info("%s: streamed, rows encoded as they are read", config.dataset)
        else:
            rows = eval_rows = None
            if config.eval_fraction is not None:
                rows, eval_rows = split_off_eval(source, config.eval_fraction, config.seed)
                eval_source = DataSource(f"{config.dataset} (held-out {config.eval_fraction:.0%})")
            train, stats = load_examples(source, tokenizer, config.data_spec, rows=rows, **options)
            lengths = train.lengths if config.group_by_length else None
            batches = ShardedBatches(train, micro_batch, rank, world, config.seed, pad_id, lengths)
            if rank == 0:
                logger.info("%s", stats.describe(config.dataset))
        if eval_source is not None:
            eval_examples, eval_stats = load_examples(
                eval_source, tokenizer, config.data_spec, rows=eval_rows, **options
            )
            if rank == 0:
                logger.info("%s", eval_stats.describe(eval_source.name))
    return batches, eval_examples


def loop(
    config: TrainerConfig,
    engine: Any,
    teacher: Teacher,
    tokenizer: Any,
    batches: ShardedBatches | StreamingBatches,
    eval_examples: Sequence[Example] | None,
    start_step: int,
    stop: StopSignal,
    generator: TeacherGenerator | None = None,
    on_policy: OnPolicy | None = None,
) -> dict[str, float]:
    """Steps ``start_step + 1 .. max_steps``; returns the last log record and evaluation.

    After each optimizer step the ranks agree whether any got SIGTERM; if so all save a checkpoint of that
    step and :class:`Preempted` is raised (the last step is finished as usual instead).
    With ``--async_rollouts`` the next step's micro-batches are taken from the feed before this step trains
    (their completions are sampled meanwhile); a checkpoint still records the data position of this step's.
    """
    is_main, gas = dist.get_rank() == 0, engine.gradient_accumulation_steps()
    out_dir = Path(config.output_dir)
    feed = TeacherFeed(  # requests the teacher rows of dataset steps `prefetch_depth` micro-batches ahead
        iter(batches), teacher.request, depth=config.prefetch_depth, micro_per_step=gas, first_step=start_step + 1,
        ahead=lambda s: step_source(config.seed, s, config.lmbda, config.seq_kd) == "dataset",
    )  # fmt: skip
    run_log = RunLog(out_dir, is_main, config.report_to == "tensorboard", append=start_step > 0)
    bar = tqdm(
        total=config.max_steps, initial=start_step, desc="distilling", unit="step", disable=not is_main, mininterval=1.0
    )
    started, window, last = time.perf_counter(), LogWindow(), {}
    ahead: tuple[int, list[Any], dict[str, int]] | None = None  # the next step's micro-batches, taken early
    data_state = feed.consumed_state  # the data position of the last step taken (a checkpoint's)
    try:
        if stop.agreed(engine.device):  # SIGTERM during set-up: nothing trained since start_step
            raise Preempted(start_step, None)
        for step in range(start_step + 1, config.max_steps + 1):
            # fetch: this step's micro-batches; dataset steps' teacher rows are already in flight
            source = step_source(config.seed, step, config.lmbda, config.seq_kd)
            before = data_state  # the position before this step's micro-batches: an outage checkpoints step - 1
            if ahead is not None and ahead[0] == step:
                _, items, data_state = ahead
            else:
                items = feed.take(gas)
                data_state = feed.consumed_state
            if source == "student":  # the student's samples, each scored by the teacher as soon as it exists
                assert on_policy is not None
                items = on_policy.items(step, [b for b, _ in items])
            elif source == "teacher":
                sampling = sampling_for(config, (tokenizer.eos_token_id,), tokenizer.pad_token_id)
                items, _ = generated_step(
                    config, source, [b for b, _ in items], None, teacher, sampling, step, generator
                )
            # teacher rows: an outage is waited out here; past --teacher_wait_timeout every rank stops together
            # (an in-process teacher computes its rows in the step, one micro-batch at a time, and has no outage)
            try:
                waited = 0.0 if isinstance(teacher, LocalTeacher) else await_step_rows(items, engine.device)
            except TeacherOutageError:
                save_checkpoint(engine, out_dir / CHECKPOINTS_DIR, step - 1, before)
                if stop.agreed(engine.device):  # preempted while waiting: a restart resumes from this checkpoint
                    raise Preempted(step - 1, out_dir / CHECKPOINTS_DIR / checkpoint_tag(step - 1)) from None
                raise
            # async rollouts: the next on-policy step samples from the weights before this step's update
            nxt = step + 1
            if (
                config.async_rollouts
                and nxt <= config.max_steps
                and step_source(config.seed, nxt, config.lmbda, config.seq_kd) == "student"
            ):
                assert on_policy is not None
                ahead = (nxt, feed.take(gas), feed.consumed_state)
                on_policy.launch(nxt, [b for b, _ in ahead[1]], version=step - 1)
            # forward/backward: the GKD loss (plus sft_alpha x CE on dataset steps), one optimizer step
            sft_alpha = config.sft_alpha if source == "dataset" else 0.0
            objective = config.loss_type if source == "student" else "gkd"
            stats = train_step(
                engine, items, config.loss, sft_alpha, step=step, fused_loss=config.fused_loss, objective=objective
            )
            stats.teacher_wait_s += waited
            window.add(stats, on_policy=source == "student")
            # preempted (SIGTERM on any rank): every rank stops after this same step, with a checkpoint
            stopping = step < config.max_steps and stop.agreed(engine.device)
            # log: token means over every rank since the last record
            if step % config.logging_steps == 0 or step == config.max_steps or stopping:
                last = window.record(engine.device, with_ce=config.sft_alpha > 0)
                last.update(lr=float(engine.get_lr()[0]), elapsed_s=time.perf_counter() - started)
                if on_policy is not None:  # rank 0's rollout timings and staleness
                    last.update(on_policy.stats.record())
                    on_policy.stats.reset()
                run_log.write("train", step, last)
                bar.set_postfix(
                    loss=f"{last['loss']:.4f}",
                    tok_s=f"{last['tokens_per_s']:.0f}",
                    wait=f"{last['teacher_wait_s']:.1f}s",
                )
                window = LogWindow()
            # checkpoint: the data position of the last micro-batch consumed, not of the prefetched ones
            if stopping or (config.save_steps and step % config.save_steps == 0):
                save_checkpoint(engine, out_dir / CHECKPOINTS_DIR, step, data_state)
            if stopping:
                raise Preempted(step, out_dir / CHECKPOINTS_DIR / checkpoint_tag(step))
            # evaluate
            if eval_examples is not None and config.eval_steps and step % config.eval_steps == 0:
                last = {**last, **evaluate(config, engine, teacher, tokenizer, eval_examples, run_log, step)}
            bar.update(1)
        if eval_examples is not None and not (config.eval_steps and config.max_steps % config.eval_steps == 0):
            last = {**last, **evaluate(config, engine, teacher, tokenizer, eval_examples, run_log, config.max_steps)}
    finally:
        bar.close()
        run_log.close()
    return {**last, "wall_s": time.perf_counter() - started}


def evaluate(
    config: TrainerConfig,
    engine: Any,
    teacher: Teacher,
    tokenizer: Any,
    examples: Sequence[Example],
    run_log: RunLog,
    step: int,
) -> dict[str, float]:
    """Held-out metrics of the training student (every rank takes part), logged and returned as ``eval_*``."""
    engine.module.eval()
    metrics = sharded_eval(
        engine,
        teacher.request,
        examples,
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        batch_size=config.eval_batch_size or engine.train_micro_batch_size_per_gpu(),
        pad_id=tokenizer.pad_token_id,
        top_k=config.top_k,
        loss=config.loss,
        device=engine.device,
    )
    engine.module.train()
    run_log.write("eval", step, metrics)
    if dist.get_rank() == 0:
        logger.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
    return {f"eval_{k}": v for k, v in metrics.items()}


def main() -> None:
    stop = StopSignal()  # first: a SIGTERM while the trainer sets up must not kill it
    quiet_upstream_warnings()
    config = parse_args()
    try:
        train(config, stop)
    except Preempted as exc:
        if dist.get_rank() == 0:
            logger.warning(
                "training preempted: %s; exiting with %d so that the run is started again, and continues with "
                "--resume_from_checkpoint auto",
                exc,
                PREEMPTED_EXIT_CODE,
            )
        sys.exit(PREEMPTED_EXIT_CODE)
    except TeacherOutageError as exc:
        logger.error(
            "training stopped: %s; a checkpoint of the last step is in %s (resume with --resume_from_checkpoint "
            "auto once the teacher is back)",
            exc,
            Path(config.output_dir) / CHECKPOINTS_DIR,
        )
        sys.exit(3)
    except (TeacherError, NonFiniteLossError, DataError) as exc:
        logger.error("training stopped: %s", exc)
        sys.exit(2)
