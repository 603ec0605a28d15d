"""The quality check's verdict on a hand-made table (the benchmark itself, `avocado-ray bench quality`, is no test)."""

from avocado_ray.training.quality import verdict


def test_the_routed_teacher_must_halve_and_end_below_every_other_teacher():
    before = {
        ("code", "qwen"): {"bpb": 4.0, "kl": 3.0},
        ("code", "gemma"): {"bpb": 4.2},
        ("math", "gptoss"): {"bpb": 5.0},
        ("math", "gemma"): {"bpb": 5.0},
        ("general", "gemma"): {"bpb": 4.0},
        ("general", "gptoss"): {"bpb": 4.0},
    }
    after = {
        ("code", "qwen"): {"bpb": 2.0, "kl": 1.0},
        ("code", "gemma"): {"bpb": 2.2},  # exactly half: halved
        ("math", "gptoss"): {"bpb": 2.6},
        ("math", "gemma"): {"bpb": 3.0},  # not half
        ("general", "gemma"): {"bpb": 1.0},
        ("general", "gptoss"): {"bpb": 1.0},  # a tie is not lower
    }
    table = verdict(before, after, {"code": "qwen", "math": "gptoss", "general": "gemma"})
    assert table["code"]["teachers"]["qwen"] == {"bpb_before": 4.0, "bpb_after": 2.0, "kl_before": 3.0, "kl_after": 1.0}
    assert (table["code"]["halved"], table["code"]["lowest_on_routed"]) == (True, True)
    assert (table["math"]["halved"], table["math"]["lowest_on_routed"]) == (False, True)
    assert (table["general"]["halved"], table["general"]["lowest_on_routed"]) == (True, False)
