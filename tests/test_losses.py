"""Distillation losses against hand-computed values on tiny distributions, and the cross-tokenizer alignment.

The running example: V = 4, the student's q = (0.5, 0.25, 0.125, 0.125) (logits = log q); the teacher's top 2 are
ids 1 and 2 with p = 0.5 and 0.25, so the teacher's tail is 0.25. On those buckets (id 1, id 2, tail) the student
has (0.25, 0.125, 0.5 + 0.125 = 0.625).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from avocado_ray.training.alignment import TokenAligner
from avocado_ray.training.losses import (
    CausalLMLoss,
    LossOptions,
    Targets,
    chunked_mix,
    forward_kl,
    jsd,
    mix,
    reverse_kl,
    supervised,
)

ln = math.log
Q = [0.5, 0.25, 0.125, 0.125]


def targets(ids, probs, labels=None, distill=None):
    """Rows of teacher candidates given as probabilities (a pad id of -1 takes any value)."""
    n = len(ids)
    return Targets(
        labels=torch.tensor(labels if labels is not None else [0] * n),
        topk_ids=torch.tensor(ids),
        topk_logprobs=torch.tensor([[ln(p) for p in row] for row in probs]),
        distill=torch.tensor(distill if distill is not None else [True] * n),
    )


def logits(*rows):
    return torch.tensor([[ln(p) for p in row] for row in rows])


EXAMPLE = targets([[1, 2]], [[0.5, 0.25]])
T1 = LossOptions()


def test_forward_kl_keeps_the_mass_outside_the_top_k_as_one_tail_bucket():
    # KL(p||q) = 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.125) + 0.25 ln(0.25/0.625)
    expected = 0.5 * ln(2) + 0.25 * ln(2) + 0.25 * ln(0.4)  # = 0.290787
    assert forward_kl(logits(Q), EXAMPLE, T1).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.290787, abs=1e-6)


def test_reverse_kl():
    # KL(q||p) = 0.25 ln(0.25/0.5) + 0.125 ln(0.125/0.25) + 0.625 ln(0.625/0.25)
    expected = -0.25 * ln(2) - 0.125 * ln(2) + 0.625 * ln(2.5)  # = 0.312752
    assert reverse_kl(logits(Q), EXAMPLE, T1).item() == pytest.approx(expected, abs=1e-6)


def test_jsd_gives_the_teacher_weight_beta_in_the_mixture():
    # beta = 0.5: m = (0.375, 0.1875, 0.4375)
    kl_pm = 0.5 * ln(0.5 / 0.375) + 0.25 * ln(0.25 / 0.1875) + 0.25 * ln(0.25 / 0.4375)
    kl_qm = 0.25 * ln(0.25 / 0.375) + 0.125 * ln(0.125 / 0.1875) + 0.625 * ln(0.625 / 0.4375)
    assert jsd(logits(Q), EXAMPLE, T1).item() == pytest.approx(0.5 * kl_pm + 0.5 * kl_qm, abs=1e-6)
    # beta = 0.25: m = 0.25 p + 0.75 q = (0.3125, 0.15625, 0.53125); the teacher's KL to m weighs 0.25
    kl_pm = 0.5 * ln(0.5 / 0.3125) + 0.25 * ln(0.25 / 0.15625) + 0.25 * ln(0.25 / 0.53125)
    kl_qm = 0.25 * ln(0.25 / 0.3125) + 0.125 * ln(0.125 / 0.15625) + 0.625 * ln(0.625 / 0.53125)
    got = jsd(logits(Q), EXAMPLE, LossOptions(jsd_beta=0.25)).item()
    assert got == pytest.approx(0.25 * kl_pm + 0.75 * kl_qm, abs=1e-6)  # = 0.054437
    assert got == pytest.approx(0.054437, abs=1e-6)


def test_temperature_tempers_both_bucket_distributions_alike_and_scales_by_t_squared():
    # T = 2: each bucket distribution b becomes sqrt(b) / sum(sqrt(b))
    p = [math.sqrt(0.5), math.sqrt(0.25), math.sqrt(0.25)]  # (0.7071, 0.5, 0.5) / 1.7071
    q = [math.sqrt(0.25), math.sqrt(0.125), math.sqrt(0.625)]  # (0.5, 0.3536, 0.7906) / 1.6441
    p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
    expected = 4 * sum(a * ln(a / b) for a, b in zip(p, q))
    got = forward_kl(logits(Q), EXAMPLE, LossOptions(temperature=2.0)).item()
    assert got == pytest.approx(expected, abs=1e-6)
    # a student equal to the teacher on the buckets: q = (0.1, 0.5, 0.25, 0.15), tail 0.1 + 0.15 = 0.25 = p's tail
    equal = forward_kl(logits([0.1, 0.5, 0.25, 0.15]), EXAMPLE, LossOptions(temperature=2.0))
    assert equal.item() == pytest.approx(0.0, abs=1e-6)


def test_forward_kl_gradient_flows_to_every_logit_through_the_tail():
    # d/dz_i of -sum_b p_b log q_b: q_i - p_i for a candidate; q_j - p_tail q_j / q_tail for a tail id j
    z = logits(Q).requires_grad_()
    forward_kl(z, EXAMPLE, T1).sum().backward()
    expected = [0.5 - 0.25 * 0.5 / 0.625, 0.25 - 0.5, 0.125 - 0.25, 0.125 - 0.25 * 0.125 / 0.625]
    assert z.grad[0].tolist() == pytest.approx(expected, abs=1e-6)  # (0.3, -0.25, -0.125, 0.075)


def test_pads_do_not_count_and_an_overfull_top_k_leaves_an_epsilon_tail():
    rows = targets(
        [[1, -1], [0, -1], [1, 2]],
        # row 0: one candidate; the pad's "probability" 1.0 must be ignored
        # row 1: candidate id 0 next to a pad (clamped to id 0 inside): id 0 must stay a candidate
        # row 2: 0.75 + 0.3 > 1 (rounded float16 logprobs do this): the tail clamps to 1e-6, then renormalises
        [[0.5, 1.0], [0.25, 1.0], [0.75, 0.3]],
    )
    got = forward_kl(logits(Q, Q, Q), rows, T1)
    assert got[0].item() == pytest.approx(0.5 * ln(0.5 / 0.25) + 0.5 * ln(0.5 / 0.75), abs=1e-6)
    assert got[1].item() == pytest.approx(0.25 * ln(0.25 / 0.5) + 0.75 * ln(0.75 / 0.5), abs=1e-6)
    p = [0.75 / 1.050001, 0.3 / 1.050001, 1e-6 / 1.050001]
    expected = p[0] * ln(p[0] / 0.25) + p[1] * ln(p[1] / 0.125) + p[2] * ln(p[2] / 0.625)
    assert got[2].item() == pytest.approx(expected, abs=1e-6)


def test_supervised_is_cross_entropy_on_the_label_and_ignores_minus_100():
    rows = targets([[1, 2], [1, 2]], [[0.5, 0.25], [0.5, 0.25]], labels=[2, -100])
    assert supervised(logits(Q, Q), rows, T1).tolist() == pytest.approx([ln(8), 0.0], abs=1e-6)  # -ln 0.125


def test_mix_weights_each_term_falls_back_to_supervised_and_ignores_masked_positions():
    # row 0 distils; row 1 has no teacher distribution (falls back); row 2 is masked out (its values must not count)
    rows = targets(
        [[1, 2], [-1, -1], [1, 2]], [[0.5, 0.25], [1, 1], [0.5, 0.25]], labels=[2, 1, 3], distill=[True, False, True]
    )
    z = logits(Q, Q, [0.97, 0.01, 0.01, 0.01]).requires_grad_()
    mixed = mix(z, rows, torch.tensor([True, True, False]), {"supervised": 0.5, "forward_kl": 2.0}, T1)
    ce0, ce1, kl0 = ln(8), ln(4), 0.5 * ln(2) + 0.25 * ln(2) + 0.25 * ln(0.4)
    # row 0: 0.5 ce0 + 2 kl0; row 1: 0.5 ce1 + 2 ce1 (the divergence's weight moves to the supervised loss)
    assert mixed.total.item() == pytest.approx(0.5 * ce0 + 2 * kl0 + 2.5 * ce1, abs=1e-5)
    assert mixed.tokens.item() == 2
    assert mixed.terms["supervised"][0].item() == pytest.approx(ce0 + ce1, abs=1e-5)
    assert mixed.terms["supervised"][1].item() == 2
    assert mixed.terms["forward_kl"][0].item() == pytest.approx(kl0, abs=1e-6)
    assert mixed.terms["forward_kl"][1].item() == 1
    assert mixed.total.requires_grad and not mixed.terms["forward_kl"][0].requires_grad
    mixed.total.backward()
    assert z.grad[2].abs().sum().item() == 0.0 and torch.isfinite(z.grad).all()


def test_mix_and_options_refuse_what_they_cannot_compute():
    with pytest.raises(ValueError, match="forward_kl"):
        mix(logits(Q), EXAMPLE, torch.tensor([True]), {"fwd_kl": 1.0}, T1)
    with pytest.raises(ValueError):
        LossOptions(jsd_beta=1.0)
    with pytest.raises(ValueError):
        LossOptions(temperature=0.0)


# Bounded memory: the loss of hidden @ W^T taken chunk by chunk equals the loss of the full logits.
def random_case(n=37, hidden=16, vocab=50, k=5, seed=0):
    """Hidden states, an output weight and targets of n positions: a few rows fall back, pads and label -100."""
    gen = torch.Generator().manual_seed(seed)
    h, w = torch.randn(n, hidden, generator=gen), torch.randn(vocab, hidden, generator=gen) / 2
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    ids[::4, -2:] = -1  # pads
    logprobs = torch.log_softmax(torch.randn(n, k, generator=gen), -1) - 0.3  # a tail of 1 - e^-0.3
    labels = torch.randint(vocab, (n,), generator=gen)
    labels[::7] = -100
    distill = torch.rand(n, generator=gen) > 0.2
    return h, w, Targets(labels, ids, logprobs, distill), torch.rand(n, generator=gen) > 0.1


ALL_LOSSES = {"supervised": 0.5, "forward_kl": 1.0, "reverse_kl": 0.25, "jsd": 2.0}


@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 1024])  # 10 does not divide 37 positions
@pytest.mark.parametrize("options", [T1, LossOptions(temperature=2.0, jsd_beta=0.3)])
def test_chunked_mix_equals_mix_of_the_full_logits_in_value_terms_and_gradients(chunk, options):
    h, w, rows, mask = random_case()
    chunked_options = LossOptions(options.temperature, options.jsd_beta, chunk_tokens=chunk)
    naive_h, naive_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    naive = mix(naive_h @ naive_w.T, rows, mask, ALL_LOSSES, options)
    naive.total.backward()
    h.requires_grad_(), w.requires_grad_()
    chunked = chunked_mix(h, w, rows, mask, ALL_LOSSES, chunked_options)
    (3 * chunked.total).backward()  # the upstream gradient scales both parts
    assert chunked.total.item() == pytest.approx(naive.total.item(), rel=1e-5)
    assert chunked.tokens.item() == naive.tokens.item()
    for name in ALL_LOSSES:
        assert chunked.terms[name][0].item() == pytest.approx(naive.terms[name][0].item(), rel=1e-5)
        assert chunked.terms[name][1].item() == naive.terms[name][1].item()
    torch.testing.assert_close(h.grad, 3 * naive_h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, 3 * naive_w.grad, rtol=1e-5, atol=1e-6)


def test_chunked_mix_reproduces_the_hand_computed_example_and_needs_no_gradient():
    # one-hot hidden states make the logits the weight's rows: the running example's KL, row by row
    w = logits(Q, Q).T.contiguous()  # [V, 2]
    rows = targets([[1, 2], [1, 2]], [[0.5, 0.25], [0.5, 0.25]], labels=[2, 2])
    with torch.no_grad():
        got = chunked_mix(
            torch.eye(2), w, rows, torch.tensor([True, True]), {"forward_kl": 1.0}, LossOptions(chunk_tokens=1)
        )
    kl = 0.5 * ln(2) + 0.25 * ln(2) + 0.25 * ln(0.4)
    assert got.total.item() == pytest.approx(2 * kl, rel=1e-5) and not got.total.requires_grad
    empty = chunked_mix(torch.zeros(0, 2), w, rows[0:0], torch.zeros(0, dtype=torch.bool), {"forward_kl": 1.0}, T1)
    assert empty.total.item() == 0.0 and empty.terms["forward_kl"][1].item() == 0


def test_causal_lm_loss_equals_the_loss_of_the_models_own_logits(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    ids = torch.randint(model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).repeat(2, 1)
    at = torch.zeros(2, 12, dtype=torch.bool)
    at[:, 4:11] = True
    labels = ids[:, 1:][at[:, :-1]]
    no_teacher = Targets(labels, torch.full((14, 0), -1), torch.zeros(14, 0), torch.zeros(14, dtype=torch.bool))
    weights = {"supervised": 1.0}
    got = CausalLMLoss(model)(ids, positions, at, no_teacher, weights, LossOptions(chunk_tokens=3))
    expected = torch.nn.functional.cross_entropy(model(ids).logits[at], labels, reduction="sum")
    assert got.total.item() == pytest.approx(expected.item(), rel=1e-5)
    got.total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_gpu_check_trains_a_student_with_both_losses_alike_without_ray_vllm_or_deepspeed():
    # scripts/gpu-check --tiny: the device check on CPU; 95 answer positions in chunks of 32 (the last one short)
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"
    done = subprocess.run(
        [sys.executable, str(script), "--tiny", "--chunk-tokens", "32", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["imported"] == [] and report["answer_positions"] == 95
    for side in ("chunked", "naive"):
        assert {"tokens_per_s", "mfu", "peak_mem_gb", "first_loss", "last_loss"} <= set(report[side])
        assert report[side]["tokens_per_s"] > 0
    assert report["first_loss_rel_diff"] < 1e-5
    # four AdamW steps on the two losses' gradients end at the same loss: the gradients agree
    assert report["chunked"]["last_loss"] == pytest.approx(report["naive"]["last_loss"], rel=1e-5)
    assert report["chunked"]["last_loss"] < report["chunked"]["first_loss"]


# Cross-tokenizer alignment on two hand-made byte-level BPE tokenizers. Ids: "<end>" is 0, then `tokens` in order
# from 1, then the remaining byte characters. In byte-level BPE a space is "Ġ"; "日" is the bytes E6 97 A5, whose
# characters are "æ", "Ĺ", "¥"; "é" is C3 A9, "Ã©".
BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False)
NICHI = "æĹ"  # the first two bytes of 日: part of a character


def byte_level_tokenizer(tokens, merges):
    vocab = {"<end>": 0, **{token: i + 1 for i, token in enumerate(tokens)}}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer, tokenizer.decoder = BYTE_LEVEL, decoders.ByteLevel()
    tokenizer.add_special_tokens(["<end>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<end>")


@pytest.fixture(scope="module")
def teacher():
    # ids: hello 1, Ġworld 2, hell 3, Ġw 4, he 5, ll 6, or 7, Ġwor 8, Ġworl 9, æĹ 10, Ã© 11
    tokens = ["hello", "Ġworld", "hell", "Ġw", "he", "ll", "or", "Ġwor", "Ġworl", NICHI, "Ã©"]
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or")]
    merges += [("Ġwor", "l"), ("Ġworl", "d"), ("æ", "Ĺ"), ("Ã", "©")]
    return byte_level_tokenizer(tokens, merges)


@pytest.fixture(scope="module")
def student():
    # ids: hel 1, lo 2, Ġworld 3, Ġw 4, he 5, or 6, Ġwor 7, Ġworl 8, æĹ 9; no "hello", "hell" or "Ã©"
    tokens = ["hel", "lo", "Ġworld", "Ġw", "he", "or", "Ġwor", "Ġworl", NICHI]
    merges = [("h", "e"), ("he", "l"), ("l", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("Ġwor", "l")]
    merges += [("Ġworl", "d"), ("æ", "Ĺ")]
    return byte_level_tokenizer(tokens, merges)


def test_the_two_tokenizations_differ(teacher, student):
    assert teacher.convert_ids_to_tokens(teacher.encode("hello world")) == ["hello", "Ġworld"]
    assert student.convert_ids_to_tokens(student.encode("hello world")) == ["hel", "lo", "Ġworld"]
    assert teacher.convert_ids_to_tokens(teacher.encode("日é")) == [NICHI, "¥", "Ã©"]
    assert student.convert_ids_to_tokens(student.encode("日é")) == [NICHI, "¥", "Ã", "©"]


def test_alignment_by_byte_spans_maps_candidates_by_their_bytes(teacher, student):
    # teacher spans: hello [0,5) Ġworld [5,11) <end> [11,11); student: hel [0,3) lo [3,5) Ġworld [5,11) <end> [11,11)
    # "hello" is split by the student: rows 0 and 1 fall back; Ġworld and the end align.
    aligned = TokenAligner(teacher, student).align(
        "hello world",
        [1, 2, 0],
        [[1, 3], [2, 3, 4], [0, 1, 2]],  # at " world": Ġworld, hell, Ġw; at the end: <end>, hello, Ġworld
        [[-0.1, -2.5], [-0.5, -1.6, -2.3], [-0.2, -1.8, -3.0]],
    )
    assert aligned.student_ids == [1, 2, 3, 0]
    assert aligned.distill.tolist() == [False, False, True, True]
    # Ġworld -> 3, "hell" has no student token (its mass joins the tail), Ġw -> 4; <end> -> 0, Ġworld -> 3
    assert aligned.topk_ids.tolist() == [[-1, -1, -1], [-1, -1, -1], [3, 4, -1], [0, 3, -1]]
    assert aligned.topk_logprobs[2, :2].tolist() == pytest.approx([-0.5, -2.3])
    assert aligned.topk_logprobs[3, :2].tolist() == pytest.approx([-0.2, -3.0])
    assert aligned.aligned_fraction == 0.5


def test_alignment_of_a_character_both_tokenizers_cut_at_the_same_byte(teacher, student):
    # 日é = E6 97 | A5 | C3 A9. teacher: æĹ [0,2) ¥ [2,3) Ã© [3,5); student: æĹ [0,2) ¥ [2,3) Ã [3,4) © [4,5)
    # The partial-character tokens align; é does not (one teacher token, two student tokens).
    yen_t, yen_s = teacher.convert_tokens_to_ids("¥"), student.convert_tokens_to_ids("¥")
    aligned = TokenAligner(teacher, student).align(
        "日é", [10, yen_t, 11], [[10, 11], [yen_t, 10], [11, 10]], [[-0.1, -3.0], [-0.2, -2.0], [-0.3, -1.5]]
    )
    assert aligned.distill.tolist() == [True, True, False, False, False]  # no teacher end token: the end falls back
    assert aligned.topk_ids[:2].tolist() == [[9, -1], [yen_s, 9]]  # Ã© (11) has no student token


def test_alignment_stops_where_the_teacher_stops_spelling_the_answer(teacher, student):
    # the teacher's tokens spell "hello world" but the answer reads "hello there": nothing after "hello" aligns
    aligned = TokenAligner(teacher, student).align("hello there", [1, 2, 0], [[1], [2], [0]], [[-0.1]] * 3)
    assert not aligned.distill.any()
    # served without top-k logprobs: supervised everywhere
    aligned = TokenAligner(teacher, student).align("hello world", [1, 2, 0], [], [])
    assert aligned.topk_ids.shape == (4, 0) and not aligned.distill.any()


def test_alignment_is_the_identity_for_the_students_own_tokenizer(student):
    aligned = TokenAligner(student, student).align(
        "hello world", [1, 2, 3, 0], [[1, 5], [2, 1], [3, 4], [0, 3]], [[-0.1, -2.0]] * 4
    )
    assert aligned.distill.all()
    assert aligned.topk_ids.tolist() == [[1, 5], [2, 1], [3, 4], [0, 3]]


def test_alignment_on_the_tiny_teachers(tiny_models):
    # Real family tokenizers: every aligned row's top candidate (the teacher's own token) maps to the student's
    # token at that row, and tokens the two cut differently fall back.
    student = AutoTokenizer.from_pretrained(tiny_models["student"])
    teacher = AutoTokenizer.from_pretrained(tiny_models["gemma"])
    text = "The quick brown fox jumps over the lazy dog. def add(a, b): return a + b  你好，世界！"
    ids = teacher.encode(text, add_special_tokens=False) + [teacher.eos_token_id]
    aligned = TokenAligner(teacher, student).align(text, ids, [[i] for i in ids], [[-0.1]] * len(ids))
    rows = aligned.distill.nonzero().flatten().tolist()
    assert 0.5 < aligned.aligned_fraction < 1.0
    assert [aligned.topk_ids[r, 0].item() for r in rows] == [aligned.student_ids[r] for r in rows]
    assert rows[-1] == len(aligned.student_ids) - 1  # the end-of-answer row aligns with the teacher's end token


def test_each_loss_takes_its_own_parameters_from_the_config_and_a_bare_number_is_a_weight():
    from avocado_ray.config import TrainerConfig

    h, w, rows, mask = random_case()
    losses = TrainerConfig(
        losses={
            "supervised": 0.5,
            "forward_kl": {"weight": 1.0, "temperature": 2.0},
            "jsd": {"weight": 2.0, "beta": 0.3},
        }
    ).losses
    got = mix(h @ w.T, rows, mask, losses, T1).terms
    kl = mix(h @ w.T, rows, mask, {"forward_kl": 1.0}, LossOptions(temperature=2.0)).terms["forward_kl"]
    jsd_alone = mix(h @ w.T, rows, mask, {"jsd": 2.0}, LossOptions(jsd_beta=0.3)).terms["jsd"]
    assert torch.allclose(got["forward_kl"][0], kl[0]) and torch.allclose(got["jsd"][0], jsd_alone[0])
    total = mix(h @ w.T, rows, mask, losses, T1).total
    by_hand = (
        0.5 * mix(h @ w.T, rows, mask, {"supervised": 1.0}, T1).total
        + mix(h @ w.T, rows, mask, {"forward_kl": 1.0}, LossOptions(temperature=2.0)).total
        + 2.0 * mix(h @ w.T, rows, mask, {"jsd": 1.0}, LossOptions(jsd_beta=0.3)).total
    )
    assert torch.allclose(total, by_hand, rtol=1e-5)
