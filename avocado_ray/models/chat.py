"""Rendering chat messages into prompt token ids, the one way teachers, judge and trainer all do it."""

from __future__ import annotations


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` in the model's own chat template, ending with the assistant turn's opening.

    The template already holds any special tokens (e.g. Gemma's <bos>), so encoding adds none.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)
