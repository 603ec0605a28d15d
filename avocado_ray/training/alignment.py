"""The alignment of a teacher's tokens to the student's, for the distillation losses (losses.py).

Cross-tokenizer alignment
-------------------------
`TokenAligner` turns a teacher's answer (its token ids and per-token top k) into `Targets` rows over the
student's tokens of the same answer text, the student's end token included, as the trainer labels the answer.

1. Each token id has the bytes it contributes to decoded text: for byte-level BPE (Qwen, gpt-oss, GPT-2
   style) the inverse of the byte-to-unicode table; otherwise SentencePiece style, "▁" as a space and <0xNN>
   byte-fallback tokens as that byte (Gemma, Llama). Special tokens contribute nothing.
2. Both token sequences are laid over the answer's UTF-8 bytes: token i spans [start, end). A sequence stops
   being laid out at its first token that does not spell the next bytes of the answer, or at its first special
   token; a special token exactly at the end of the text is the end-of-answer token, with the empty span
   [len, len). Nothing after that point is aligned, as the two models no longer condition on the same text.
3. A student token whose span equals one teacher token's span is aligned with it: both predict the same bytes
   after the same text. A span that one tokenizer splits and the other does not (such as "hello" against
   "hel" + "lo") is not aligned. Spans compare bytes, so a token that holds part of a multibyte character
   aligns too when both tokenizers cut the character at the same bytes.
4. At an aligned position each teacher candidate maps to the student token of exactly the same bytes, the
   teacher's end token to the student's; candidates with no such token are dropped and their mass joins the
   tail bucket (the tail is 1 - the kept mass). Positions that are not aligned, or keep no candidate, have
   `distill` false and `mix` applies the supervised loss there.

Limits. The teacher's probability that its next token is exactly the candidate's bytes is read as the
student's probability of its token with those bytes, although either model could spell the same text with
other tokens; the tail bucket absorbs the unmapped rest. Tokenizers that alter text (normalisation such as
NFC, a prefix space) align only up to the first altered byte. Where tokenizations rarely share boundaries
(a large vocabulary's whole words against a small one's pieces) most positions fall back to the supervised
loss; `Alignment.aligned_fraction` measures how many do not. When the teacher's vocabulary and end token are the
student's and its tokens are the student's tokenisation of the answer, alignment is the identity.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: printable bytes are themselves, the rest shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
    return table


def _uses_byte_level(tokenizer) -> bool:
    def types(node) -> set[str]:
        if not isinstance(node, dict):
            return set()
        return {node.get("type", "")} | {t for child in node.get("decoders") or [] for t in types(child)}

    return "ByteLevel" in types(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each id adds to decoded text (HF fast tokenizer); None for special tokens and unused ids."""
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    added = {i: token.content.encode() for i, token in tokenizer.added_tokens_decoder.items()}
    byte_level = _byte_level_decoder() if _uses_byte_level(tokenizer) else None
    pieces: list[bytes | None] = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in special or token is None:
            pieces.append(None)
        elif i in added:
            pieces.append(added[i])
        elif byte_level is not None:
            pieces.append(bytes(byte_level[c] for c in token) if all(c in byte_level for c in token) else None)
        elif match := _BYTE_TOKEN.fullmatch(token):
            pieces.append(bytes([int(match.group(1), 16)]))
        else:
            pieces.append(token.replace("▁", " ").encode())
    return [piece or None for piece in pieces]


def _spans(ids: Sequence[int], pieces: list[bytes | None], text: bytes, end_id: int | None) -> list[tuple[int, int]]:
    """Byte spans over `text` of the leading tokens that spell it (step 2 of the module docstring)."""
    spans, cursor = [], 0
    for token in ids:
        piece = pieces[token] if 0 <= token < len(pieces) else None
        if piece is None:
            if token == end_id and cursor == len(text):
                spans.append((cursor, cursor))
            break
        if text[cursor : cursor + len(piece)] != piece:
            break
        spans.append((cursor, cursor + len(piece)))
        cursor += len(piece)
    return spans


@dataclass(frozen=True)
class Alignment:
    """A teacher's answer as rows over the student's answer tokens (row i: the distribution of student token i)."""

    student_ids: list[int]  # the answer in student tokens, then the student's end token
    topk_ids: torch.Tensor  # [n, K] int64 student ids, -1 pads
    topk_logprobs: torch.Tensor  # [n, K] float32 teacher logprobs of those ids
    distill: torch.Tensor  # [n] bool: aligned and kept at least one candidate

    @property
    def aligned_fraction(self) -> float:
        return float(self.distill.float().mean())


class TokenAligner:
    """Aligns one teacher's answers to the student's tokens; build once per teacher (it indexes both vocabularies)."""

    def __init__(self, teacher_tokenizer, student_tokenizer):
        self.student = student_tokenizer
        self.teacher_end, self.student_end = teacher_tokenizer.eos_token_id, student_tokenizer.eos_token_id
        same_vocab = teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()
        self.identity = same_vocab and self.teacher_end == self.student_end
        self.teacher_pieces = token_bytes(teacher_tokenizer)
        self.student_pieces = self.teacher_pieces if same_vocab else token_bytes(student_tokenizer)
        if same_vocab:
            self.to_student = list(range(len(self.teacher_pieces)))
        else:
            index: dict[bytes, int] = {}
            for i, piece in enumerate(self.student_pieces):
                if piece is not None:
                    index.setdefault(piece, i)
            self.to_student = [-1 if piece is None else index.get(piece, -1) for piece in self.teacher_pieces]
        if self.teacher_end is not None and self.teacher_end < len(self.to_student):
            self.to_student[self.teacher_end] = self.student_end

    def align(
        self,
        answer: str,
        teacher_ids: Sequence[int],
        topk_ids: Sequence[Sequence[int]],
        topk_logprobs: Sequence[Sequence[float]],
    ) -> Alignment:
        """Rows over `student.encode(answer) + [end]` from the teacher's tokens and their top k (one row per token)."""
        student_ids = self.student.encode(answer, add_special_tokens=False) + [self.student_end]
        width = max((len(row) for row in topk_ids), default=0)
        ids = torch.full((len(student_ids), width), -1, dtype=torch.long)
        logprobs = torch.zeros((len(student_ids), width), dtype=torch.float32)
        distill = torch.zeros(len(student_ids), dtype=torch.bool)
        if len(topk_ids) != len(teacher_ids):  # served without top-k logprobs: supervised only
            return Alignment(student_ids, ids, logprobs, distill)
        if self.identity and list(teacher_ids) == student_ids:
            rows = {i: i for i in range(len(student_ids))}
        else:
            text = answer.encode()
            teacher_spans = _spans(teacher_ids, self.teacher_pieces, text, self.teacher_end)
            teacher_at = {span: j for j, span in enumerate(teacher_spans)}
            student_spans = _spans(student_ids, self.student_pieces, text, self.student_end)
            rows = {i: teacher_at[span] for i, span in enumerate(student_spans) if span in teacher_at}
        for i, j in rows.items():
            kept: dict[int, float] = {}
            for candidate, logprob in zip(topk_ids[j], topk_logprobs[j]):
                mapped = self.to_student[candidate] if 0 <= candidate < len(self.to_student) else -1
                if mapped >= 0 and mapped not in kept:
                    kept[mapped] = logprob
            ids[i, : len(kept)] = torch.tensor(list(kept), dtype=torch.long)
            logprobs[i, : len(kept)] = torch.tensor(list(kept.values()), dtype=torch.float32)
            distill[i] = bool(kept)
        return Alignment(student_ids, ids, logprobs, distill)
