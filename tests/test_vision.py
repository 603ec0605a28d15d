"""Vision: chat messages with image parts go only to a vision teacher; any other teacher rejects them, unsent."""

import pytest
import ray

from avocado_ray.config import EngineConfig, SamplingConfig, VLLMTeacher
from avocado_ray.dataplane.requests import Request
from avocado_ray.models.chat import chat_prompt_ids
from avocado_ray.models.tiny_vision import IMAGE_TOKENS
from avocado_ray.teachers.pool import TeacherPool


@pytest.fixture
def image_request(image_part):
    """Makes a multimodal request: an image of one colour and a question about it."""

    def make(prompt_id: str, color: tuple[int, int, int] = (200, 10, 10)) -> Request:
        content = [image_part(color), {"type": "text", "text": "What colour is this?"}]
        return Request(prompt_id, "multimodal", ["multimodal"], [{"role": "user", "content": content}])

    return make


@pytest.mark.slow
def test_a_teacher_without_vision_rejects_an_image_prompt_with_its_reason(teacher_pools, image_request):
    pool = teacher_pools["gemma"]
    text = Request(
        "text", "general", ["general"], [{"role": "user", "content": "Name a colour."}], sampling={"max_tokens": 4}
    )
    report, _ = pool.complete(pool.submit([image_request("image"), text]))
    assert report.samples == 1  # the text prompt of the same batch is answered
    assert [(r.id, r.code, r.reason) for r in report.rejected] == [
        ("image", "no_vision", "teacher gemma has no vision (vision: false); the prompt holds 1 image(s)")
    ]


@pytest.fixture(scope="module")
def vision_pool(tiny_models, ray_cluster):
    """A real replica of the tiny vision teacher (Idefics3 in vLLM's CPU engine)."""
    teacher = VLLMTeacher(
        name="vision",
        model="tiny:vision",
        vision=True,
        sampling=SamplingConfig(temperature=0.0, max_tokens=4, logprobs=5),
        engine=EngineConfig(max_model_len=512, enforce_eager=True, extra_args={"limit_mm_per_prompt": {"image": 2}}),
    )
    pool = TeacherPool(teacher, str(tiny_models["vision"]), use_gpu=False, max_in_flight=1)
    pool.ready()
    yield pool
    pool.shutdown()


@pytest.mark.slow
def test_a_vision_teacher_answers_image_prompts_with_the_images_as_model_input(vision_pool, tiny_models, image_request):
    from transformers import AutoTokenizer

    black, white = image_request("black", (0, 0, 0)), image_request("white", (255, 255, 255))
    broken = image_request("broken")
    broken.messages[0]["content"][0]["image_url"]["url"] = "data:image/png;base64,bm90IGFuIGltYWdl"
    ref = vision_pool.submit([black, white, broken])
    report, _ = vision_pool.complete(ref)
    rows = {row["prompt_id"]: row for row in ray.get(ref).to_pylist()}
    assert sorted(rows) == ["black", "white"]
    assert [(r.id, r.code) for r in report.rejected] == [("broken", "bad_image")]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["vision"])
    text_only = len(chat_prompt_ids(tokenizer, black.messages))  # one <image> placeholder
    assert rows["black"]["prompt_tokens"] == text_only - 1 + IMAGE_TOKENS + 3  # image tokens, two fences, global tag
    # the pixels reach the model: the same text with another image gets other next-token logprobs
    assert rows["black"]["topk_logprobs"][0] != rows["white"]["topk_logprobs"][0]
