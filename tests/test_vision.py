"""Vision: chat messages with image parts go only to a vision teacher; any other teacher rejects them, unsent."""

import base64
import io

import pytest
import ray

from avocado_ray.config import EngineConfig, SamplingConfig, VLLMTeacher
from avocado_ray.models.chat import chat_prompt_ids
from avocado_ray.models.tiny_vision import IMAGE_TOKENS
from avocado_ray.teachers.pool import TeacherPool


def image_part(color: tuple[int, int, int] = (200, 10, 10)) -> dict:
    """An OpenAI-style image part holding a small PNG as a base64 data URL."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def image_request(prompt_id: str, color: tuple[int, int, int] = (200, 10, 10)) -> dict:
    content = [image_part(color), {"type": "text", "text": "What colour is this?"}]
    return {"prompt_id": prompt_id, "domain": "multimodal", "labels": ["multimodal"],
            "messages": [{"role": "user", "content": content}]}


@pytest.mark.slow
def test_a_teacher_without_vision_rejects_an_image_prompt_with_its_reason(teacher_pools):
    pool = teacher_pools["gemma"]
    text = {"prompt_id": "text", "domain": "general", "labels": ["general"],
            "messages": [{"role": "user", "content": "Name a colour."}], "sampling": {"max_tokens": 4}}
    report, _ = pool.complete(pool.submit([image_request("image"), text]))
    assert report["samples"] == 1  # the text prompt of the same batch is answered
    assert report["rejected"] == [{
        "prompt_id": "image", "code": "no_vision",
        "reason": "teacher gemma has no vision (vision: false); the prompt holds 1 image(s)",
    }]


@pytest.fixture(scope="module")
def vision_pool(tiny_models, ray_cluster):
    """A real replica of the tiny vision teacher (Idefics3 in vLLM's CPU engine)."""
    teacher = VLLMTeacher(
        name="vision", model="tiny:vision", family="qwen2", vision=True,
        sampling=SamplingConfig(temperature=0.0, max_tokens=4, logprobs=5),
        engine=EngineConfig(max_model_len=512, enforce_eager=True, extra_args={"limit_mm_per_prompt": {"image": 2}}),
    )
    pool = TeacherPool(teacher, str(tiny_models["vision"]), use_gpu=False, max_in_flight=1)
    pool.ready()
    yield pool
    pool.shutdown()


@pytest.mark.slow
def test_a_vision_teacher_answers_image_prompts_with_the_images_as_model_input(vision_pool, tiny_models):
    from transformers import AutoTokenizer

    black, white = image_request("black", (0, 0, 0)), image_request("white", (255, 255, 255))
    broken = image_request("broken")
    broken["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,bm90IGFuIGltYWdl"
    ref = vision_pool.submit([black, white, broken])
    report, _ = vision_pool.complete(ref)
    rows = {row["prompt_id"]: row for row in ray.get(ref).to_pylist()}
    assert sorted(rows) == ["black", "white"]
    assert [(r["prompt_id"], r["code"]) for r in report["rejected"]] == [("broken", "bad_image")]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["vision"])
    text_only = len(chat_prompt_ids(tokenizer, black["messages"]))  # one <image> placeholder
    assert rows["black"]["prompt_tokens"] == text_only - 1 + IMAGE_TOKENS + 3  # image tokens, two fences, global tag
    # the pixels reach the model: the same text with another image gets other next-token logprobs
    assert rows["black"]["topk_logprobs"][0] != rows["white"]["topk_logprobs"][0]
