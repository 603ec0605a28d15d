"""Tiny, randomly initialised models of the real teacher families, built locally in seconds.

Each family gets its own byte-level BPE tokenizer (trained here, with its own vocabulary and chat
template), so the same text tokenises differently per teacher, as with real Qwen, Gemma and gpt-oss.
The student shares the Qwen-family tokenizer, as a Qwen-based student would. Shapes follow what
vLLM's CPU attention accepts (head_dim 64).

Configs refer to these models as `tiny:NAME`; `resolve_model` builds them on first use into a
cache folder and returns the folder. `tiny:NAME-trained` (NAME a teacher) is the same teacher after a short
training on text of its domain (teach.py), so that it answers in its domain's style.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from avocado_ray.config import HUB_SCHEME, TINY_SCHEME
from avocado_ray.models.shape import HEAD_DIM, HEADS, HIDDEN, LAYERS, MAX_POSITIONS
from avocado_ray.models.teach import TEACHER_MIX, TRAIN_STEPS, train_teacher, training_record

TINY_VERSION = "v4"  # bump when shapes, tokenizers, templates or teacher training change, so caches rebuild
TRAINED = "-trained"  # suffix of a teacher's name for its trained variant
# Set (to anything but empty) to serve every `tiny:NAME-trained` untrained, as `tiny:NAME`: the test suite does,
# as its runs check the machinery, not what teachers know, and training costs about a minute per teacher.
UNTRAINED_ENV = "AVOCADO_RAY_UNTRAINED_TEACHERS"


@dataclass(frozen=True)
class Family:
    """What makes one model family's tokenizer and chat format its own."""

    vocab_size: int
    corpus_mix: tuple[str, ...]  # order and repetition of corpora shape the BPE merges
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    chat_template: str


FAMILIES: dict[str, Family] = {
    "qwen2": Family(
        vocab_size=3000,
        corpus_mix=("code", "chinese", "chinese", "english"),
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        chat_template=(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    ),
    "gemma3": Family(
        vocab_size=2500,
        corpus_mix=("english", "english", "code", "chinese"),
        special_tokens=("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<end_of_turn>",
        pad="<pad>",
        chat_template=(
            "{{ bos_token }}{% for m in messages %}<start_of_turn>"
            "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
            "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
        ),
    ),
    "gpt_oss": Family(
        vocab_size=2000,
        corpus_mix=("english", "code", "chinese"),
        special_tokens=("<|endoftext|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"),
        bos=None,
        eos="<|return|>",
        pad="<|endoftext|>",
        chat_template=(
            "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
            # as gpt-oss's own: the model opens its channel (analysis: reasoning, final: answer; vLLM's harmony parser)
            "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
        ),
    ),
}

# name -> (family, seed); the student is a Qwen-family model with its own weights.
TINY_MODELS: dict[str, tuple[str, int]] = {
    "qwen": ("qwen2", 1),
    "gemma": ("gemma3", 2),
    "gptoss": ("gpt_oss", 3),
    "student": ("qwen2", 4),
    "vision": ("qwen2", 5),  # Qwen-family text and images: an Idefics3 model (tiny_vision.py)
}


def cache_root() -> Path:
    """Where tiny models are cached: $AVOCADO_RAY_CACHE, else ~/.cache/avocado-ray."""
    root = os.environ.get("AVOCADO_RAY_CACHE") or Path.home() / ".cache" / "avocado-ray"
    return Path(root) / "tiny-models" / TINY_VERSION


def _train_tokenizer(family: Family):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from avocado_ray.models import corpus

    sources = {"code": corpus.code_corpus, "english": corpus.english_corpus, "chinese": corpus.chinese_corpus}
    texts = {name: sources[name]() for name in set(family.corpus_mix)}
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=family.vocab_size,
        special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((texts[name] for name in family.corpus_mix), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        chat_template=family.chat_template,
        model_max_length=MAX_POSITIONS,
    )


def _model_config(family_name: str, tokenizer):
    from transformers import Gemma3TextConfig, GptOssConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if family_name == "qwen2":
        return Qwen2Config(
            intermediate_size=4 * HIDDEN, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"], **common
        )
    if family_name == "gemma3":
        return Gemma3TextConfig(
            intermediate_size=4 * HIDDEN,
            sliding_window=128,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=HEAD_DIM,
            tie_word_embeddings=True,
            architectures=["Gemma3ForCausalLM"],
            **common,
        )
    return GptOssConfig(
        intermediate_size=2 * HIDDEN,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,  # vLLM's gpt-oss always has its own lm_head
        rope_parameters={  # gpt-oss's YaRN, scaled to the tiny context
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": MAX_POSITIONS // 32,
            "rope_theta": 150000.0,
        },
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"],
        architectures=["GptOssForCausalLM"],
        **common,
    )


def build_tiny_model(name: str, out: Path, train_steps: int = 0) -> Path:
    """Build one tiny model (weights, config, tokenizer, chat template) into `out`; with `train_steps`, a
    teacher is then trained that many steps on its mix of domains (teach.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    family_name, seed = TINY_MODELS[name]
    tokenizer = _train_tokenizer(FAMILIES[family_name])
    if name == "vision":
        from avocado_ray.models.tiny_vision import build_tiny_vision

        return build_tiny_vision(tokenizer, out, seed)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_model_config(family_name, tokenizer), dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if train_steps:
        train_teacher(out, TEACHER_MIX[name], train_steps, seed)
    return out


def _built(target: Path, train_steps: int, mix: dict[str, int] | None) -> bool:
    """Whether `target` holds a finished model, trained `train_steps` steps on `mix` (0 steps: untrained)."""
    record = (training_record(target) or {}) if train_steps else {}
    trained_as_asked = not train_steps or (record.get("steps"), record.get("mix")) == (train_steps, mix)
    return (target / "config.json").is_file() and trained_as_asked


def build_all(
    out: Path, names: tuple[str, ...] = tuple(TINY_MODELS), train_steps: int = TRAIN_STEPS
) -> dict[str, Path]:
    """Build tiny models into `out/NAME`, atomically: a half-built folder is never visible. A `NAME-trained`
    teacher is trained `train_steps` steps, and rebuilt when it was trained another number of steps or mix."""
    if train_steps <= 0:
        raise ValueError(f"train_steps must be > 0, got {train_steps}")
    out.mkdir(parents=True, exist_ok=True)
    built = {}
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent builders (tests, demo) wait for one another
        for name in names:
            base = name.removesuffix(TRAINED)
            if base not in TINY_MODELS or (name != base and base not in TEACHER_MIX):
                raise ValueError(f"unknown tiny model {name!r}; known: {sorted(known_models())}")
            steps = train_steps if name != base else 0
            target = out / name
            if not _built(target, steps, TEACHER_MIX.get(base)):
                staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
                build_tiny_model(base, staging, steps)
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
            built[name] = target
    return built


def known_models() -> list[str]:
    """Every name `tiny:NAME` accepts: the models, and the trained variant of each teacher."""
    return [*TINY_MODELS, *(name + TRAINED for name in TEACHER_MIX)]


def tokenizer_model(model: str) -> str:
    """A model with `model`'s tokenizer that costs least to resolve: a trained tiny teacher has its untrained
    twin's tokenizer, so a trainer that needs teacher tokenizers does not train teachers."""
    return model.removesuffix(TRAINED) if model.startswith(TINY_SCHEME) else model


def resolve_model(model: str) -> str:
    """Turn `tiny:NAME` into its cached folder (building, and for `NAME-trained` training, it on first use),
    `hf:ID` into the hub id."""
    if model.startswith(HUB_SCHEME):
        return model[len(HUB_SCHEME) :]
    if not model.startswith(TINY_SCHEME):
        return model
    name = model[len(TINY_SCHEME) :]
    if os.environ.get(UNTRAINED_ENV):
        name = name.removesuffix(TRAINED)
    return str(build_all(cache_root(), (name,))[name])
