"""Tiny, locally built assets for the demo and the tests: no model hub, no downloads.

A byte-level BPE tokenizer trained with ``tokenizers`` on generated text, a small
Llama teacher pre-trained on a deterministic prompt/completion task mix, and a
smaller untrained Llama student sharing the tokenizer. Everything is seeded, and a
finished build is cached under ``<out>/<ASSET_VERSION>`` so a second run reuses it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from shared.alignment import pad_sequences

logger = logging.getLogger(__name__)

ASSET_VERSION = "tiny-v1"
SEED = 1234
WORDS = (
    "apple river stone cloud maple tiger ocean candle silver forest piano garden rocket "
    "violet mirror desert harbor lemon falcon meadow copper winter thunder island velvet anchor "
    "orbit saddle quartz ember willow canyon"
).split()
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def _example(rng: random.Random) -> dict[str, str]:
    kind = rng.choice(["copy", "reverse", "sort", "add", "after"])
    if kind in ("copy", "reverse"):
        words = rng.sample(WORDS, rng.randint(2, 5))
        out = words if kind == "copy" else words[::-1]
        return {"prompt": f"{kind}: {' '.join(words)} =>", "completion": " " + " ".join(out)}
    if kind == "sort":
        digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
        return {
            "prompt": f"sort: {' '.join(map(str, digits))} =>",
            "completion": " " + " ".join(map(str, sorted(digits))),
        }
    if kind == "add":
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return {"prompt": f"add: {a} + {b} =>", "completion": f" {a + b}"}
    i = rng.randrange(len(DAYS))
    return {"prompt": f"after {DAYS[i]} =>", "completion": f" {DAYS[(i + 1) % len(DAYS)]}"}


def make_examples(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


@dataclass(frozen=True)
class TinyLlama:
    hidden_size: int
    layers: int
    heads: int
    intermediate_size: int

    def config(self, vocab_size: int, tokenizer) -> object:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )


# head_dim 64 for the teacher: vLLM's CPU backend refuses smaller heads.
TEACHER = TinyLlama(hidden_size=128, layers=4, heads=2, intermediate_size=384)
STUDENT = TinyLlama(hidden_size=64, layers=2, heads=2, intermediate_size=192)


def encode_lm(tokenizer, rows: list[dict[str, str]]) -> list[list[int]]:
    return [
        tokenizer(r["prompt"]).input_ids + tokenizer(r["completion"]).input_ids + [tokenizer.eos_token_id] for r in rows
    ]


def pretrain_teacher(
    model: torch.nn.Module,
    seqs: list[list[int]],
    pad_id: int,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = SEED,
) -> float:
    """Plain next-token training so the teacher knows something the student does not."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss_val = float("nan")
    bar = tqdm(range(steps), desc="pre-training teacher", unit="step", mininterval=2.0)
    for _ in bar:
        idx = torch.randint(len(seqs), (batch_size,), generator=gen).tolist()
        batch = [seqs[i] for i in idx]
        ids, mask = pad_sequences(batch, pad_id)
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_val = loss.item()
        bar.set_postfix(loss=f"{loss_val:.3f}", refresh=False)
    model.eval()
    return loss_val


@dataclass(frozen=True)
class TinyAssets:
    root: Path

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def train_file(self) -> Path:
        return self.root / "data" / "train.jsonl"

    @property
    def eval_file(self) -> Path:
        return self.root / "data" / "eval.jsonl"

    @property
    def done_marker(self) -> Path:
        return self.root / "DONE"


def build_assets(
    out: Path, teacher_steps: int = 800, n_train: int = 4000, n_eval: int = 256, force: bool = False
) -> TinyAssets:
    """Build (or reuse) tokenizer, data, pre-trained teacher and untrained student."""
    from transformers import LlamaForCausalLM

    assets = TinyAssets(Path(out) / ASSET_VERSION)
    if assets.done_marker.exists() and not force:
        logger.info("reusing cached tiny models in %s", assets.root)
        return assets
    started = time.perf_counter()
    torch.manual_seed(SEED)
    train_rows, eval_rows = make_examples(n_train, SEED), make_examples(n_eval, SEED + 1)
    write_jsonl(assets.train_file, train_rows)
    write_jsonl(assets.eval_file, eval_rows)
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in train_rows])
    tokenizer.save_pretrained(assets.tokenizer)
    vocab = len(tokenizer)

    student = LlamaForCausalLM(STUDENT.config(vocab, tokenizer))
    student.save_pretrained(assets.student)
    tokenizer.save_pretrained(assets.student)

    teacher = LlamaForCausalLM(TEACHER.config(vocab, tokenizer))
    final = pretrain_teacher(teacher, encode_lm(tokenizer, train_rows), tokenizer.pad_token_id, teacher_steps)
    teacher.save_pretrained(assets.teacher)
    tokenizer.save_pretrained(assets.teacher)
    assets.done_marker.write_text(json.dumps({"teacher_final_loss": final, "vocab_size": vocab}))
    logger.info(
        "built tiny assets in %.0fs (teacher loss %.3f) at %s", time.perf_counter() - started, final, assets.root
    )
    return assets


def main() -> None:
    parser = argparse.ArgumentParser(description="Build the tiny demo/test models and data locally.")
    parser.add_argument("--out", type=Path, default=Path("runs/cache"), help="cache directory (default: runs/cache)")
    parser.add_argument("--teacher-steps", type=int, default=800, help="teacher pre-training steps")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    assets = build_assets(args.out, teacher_steps=args.teacher_steps, force=args.force)
    print(assets.root)


if __name__ == "__main__":
    main()
