"""Rendering chat messages into prompt token ids as vLLM's chat handling renders them.

A teacher renders with its engine's own renderer (vLLM's `parse_chat_messages` and chat-template application,
images loaded as multi-modal data: `TeacherReplica`); the judge and the trainer's student, which have no engine,
render here the same way, from vLLM's own pieces: the template's content format is vLLM's detection (a template
that loops over a message's content parts takes "openai" parts, any other a plain string), text parts are
flattened or kept as vLLM keeps them, and an image part reaches an "openai" template as `{"type": "image"}`, the
part every family's template turns into its image placeholder (Gemma 3's `<start_of_image>`, Idefics3's
`<image>`). A string-format template gets `image_placeholder` (the model's own, as vLLM writes it) before the
text, or no image mark for a text-only model. tests/test_templates.py holds this to the families' real templates
and to vLLM's renderer.
"""

from __future__ import annotations

TEXT_PART = "text"
IMAGE_PARTS = ("image_url", "image")  # the prompt format's image parts (dataplane.prompts.image_urls)


def openai_messages(messages: list[dict]) -> list[dict]:
    """The messages in OpenAI's chat format, which vLLM parses: an `{"type": "image", "image": url}` part (which
    the prompt format also accepts) becomes an `image_url` part."""

    def part(item):
        if isinstance(item, dict) and item.get("type") == "image":
            url = item.get("image")
            return {"type": "image_url", "image_url": url if isinstance(url, dict) else {"url": str(url)}}
        return item

    return [
        {**m, "content": [part(p) for p in m["content"]]} if isinstance(m.get("content"), list) else m for m in messages
    ]


def content_format(chat_template: str) -> str:
    """'openai' when the template reads a message's content as a list of parts, else 'string': vLLM's own
    detection (the one its renderer applies with `chat_template_content_format: auto`)."""
    from vllm.renderers.hf import _detect_content_format

    return _detect_content_format(chat_template, default="string")


def _content(content, openai: bool, image_placeholder: str | None):
    """One message's content as vLLM's parser hands it to a template of that format."""
    from vllm.renderers.chat_utils import _get_full_multimodal_text_prompt

    parts = [{"type": TEXT_PART, "text": content}] if isinstance(content, str) else list(content or [])
    if openai:
        return [
            {"type": TEXT_PART, "text": p["text"]} if p.get("type") == TEXT_PART else {"type": "image"}
            for p in parts
            if p.get("type") in (TEXT_PART, *IMAGE_PARTS)
        ]
    texts = [p["text"] for p in parts if p.get("type") == TEXT_PART]
    images = sum(p.get("type") in IMAGE_PARTS for p in parts)
    if not images or image_placeholder is None:
        return "\n".join(texts)
    return _get_full_multimodal_text_prompt({"image": [image_placeholder] * images}, texts, interleave_strings=False)


def render(
    tokenizer, messages: list[dict], chat_template: str | None = None, image_placeholder: str | None = None
) -> str:
    """The prompt text of `messages` in `chat_template` (the tokenizer's own by default), ending with the assistant
    turn's opening."""
    template = chat_template or tokenizer.get_chat_template()
    openai = content_format(template) == "openai"
    conversation = [{**m, "content": _content(m.get("content"), openai, image_placeholder)} for m in messages]
    return tokenizer.apply_chat_template(
        conversation, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def chat_prompt_ids(tokenizer, messages: list[dict], image_placeholder: str | None = None) -> list[int]:
    """Token ids of `messages` in the model's own chat template, ending with the assistant turn's opening.

    The template already holds any special tokens (e.g. Gemma's <bos>), so encoding adds none.
    """
    text = render(tokenizer, messages, image_placeholder=image_placeholder)
    return tokenizer.encode(text, add_special_tokens=False)
