"""A tiny, randomly initialised vision-language teacher (`tiny:vision`) that vLLM's CPU build serves.

The architecture is Idefics3 (a SigLIP-style vision encoder, pixel shuffle, a Llama text model), the one
of vLLM 0.32's vision models whose code and Hugging Face image processor both run without torchvision, which
this project uninstalls (its builds do not match the CPU torch): Qwen2-VL, Qwen2.5-VL, Gemma 3, LLaVA and
PaliGemma import torchvision on the way. Text uses the Qwen-family tokenizer with Idefics3's image tokens
added; the chat template writes one `<image>` per image part, which the processor expands.
"""

from __future__ import annotations

from pathlib import Path

from avocado_ray.models.shape import HEAD_DIM, HEADS, HIDDEN, LAYERS, MAX_POSITIONS

IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR = 64, 16, 2  # a 4x4 patch grid, shuffled to 4 image tokens
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
# Idefics3's processor looks up every one of these (the row/column tags serve split images; we never split).
IMAGE_SPECIAL_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>") + tuple(
    f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% elif p['type'] in ('image_url', 'image') %}<image>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_vision(tokenizer, out: Path, seed: int) -> Path:
    """Save the vision teacher (weights, config, tokenizer, processor) into `out`; `tokenizer` is a trained
    Qwen-family tokenizer. The text model has the other tiny models' shape."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    tokenizer.add_special_tokens({"additional_special_tokens": list(IMAGE_SPECIAL_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        **ids,
    )
    config = Idefics3Config(
        text_config=text,
        vision_config={
            "hidden_size": HIDDEN,
            "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": HEADS,  # head_dim 64, as vLLM's CPU attention wants
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True,
        architectures=["Idefics3ForConditionalGeneration"],
        **ids,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    image_processor = Idefics3ImageProcessorPil(  # one tile per image, resized to the encoder's size
        do_image_splitting=False, size={"longest_edge": IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}
    )
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=IMAGE_TOKENS, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
