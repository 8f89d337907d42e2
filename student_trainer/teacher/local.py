"""An in-process transformers teacher on every rank: full-vocabulary rows, and generation for ``--seq_kd``."""

from __future__ import annotations

import torch

from shared.fingerprint import tokenizer_fingerprint
from student_trainer.data import Batch
from student_trainer.generation import generate_completions
from student_trainer.modeling import RowLogitsLM
from student_trainer.teacher.errors import TeacherMismatchError
from student_trainer.teacher.rows import Deferred, FullRows, Handle, TeacherRows


class LocalTeacher:
    """Checked against the student's tokenizer at construction; weights load with :meth:`load` on the rank's device."""

    can_generate = True

    def __init__(self, path: str, student_fingerprint: str, student_vocab: int) -> None:
        from transformers import AutoTokenizer

        fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(path))
        if fingerprint != student_fingerprint:
            raise TeacherMismatchError(
                f"tokenizer mismatch: teacher {path} has {fingerprint}, student has {student_fingerprint}; "
                "teacher and student must share a tokenizer"
            )
        self.path, self.student_vocab = path, student_vocab
        self.model: torch.nn.Module | None = None

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).to(device).eval()
        model.requires_grad_(False)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        if vocab != self.student_vocab:
            raise TeacherMismatchError(
                f"vocabulary size mismatch: teacher has {vocab}, student has {self.student_vocab}"
            )
        self.model = model
        self._rows = RowLogitsLM(model)

    def row_logits(self, batch: Batch) -> FullRows:
        assert self.model is not None, "load() first"
        device = next(self.model.parameters()).device
        with torch.no_grad():
            b_idx, t_idx = batch.row_index(device)
            logits = self._rows(batch.input_ids.to(device), batch.attention_mask.to(device), b_idx, t_idx)
        return FullRows(logits)

    def request(self, batch: Batch, on_policy: bool = False) -> Handle[TeacherRows]:  # full rows hold every token
        return Deferred(lambda: self.row_logits(batch))

    def generate(
        self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_id: int, pad_id: int, seed: int
    ) -> list[list[int]]:
        assert self.model is not None, "load() first"
        return generate_completions(
            self.model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_id=eos_id,
            pad_id=pad_id,
            seed=seed,
        )

    def close(self) -> None:
        self.model = None
