"""The tiny models' trained teachers: training lowers the loss, the result is cached, and is rebuilt when the
number of steps or the mix changes; tests serve the untrained ones."""

from __future__ import annotations

import pytest

from avocado_ray.models.teach import TEACHER_MIX, training_record
from avocado_ray.models.tiny import UNTRAINED_ENV, build_all, resolve_model


def test_a_trained_teacher_learns_is_cached_and_is_rebuilt_for_other_steps_or_mix(tmp_path, monkeypatch):
    folder = build_all(tmp_path, ("gptoss-trained",), train_steps=30)["gptoss-trained"]
    record = training_record(folder)
    assert record["steps"] == 30 and record["mix"] == TEACHER_MIX["gptoss"]
    assert record["last_loss"] < record["first_loss"] - 1  # a random model starts near ln(vocab) = 7.6
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_all(tmp_path, ("gptoss-trained",), train_steps=30)["gptoss-trained"] == folder
    assert weights.stat().st_mtime_ns == stamp  # cached, not trained again
    build_all(tmp_path, ("gptoss-trained",), train_steps=2)
    assert training_record(folder)["steps"] == 2
    monkeypatch.setitem(TEACHER_MIX, "gptoss", {"arithmetic": 1})
    build_all(tmp_path, ("gptoss-trained",), train_steps=2)
    assert training_record(folder)["mix"] == {"arithmetic": 1}
    assert not (tmp_path / "gptoss").exists()  # the untrained model is not a by-product


def test_unknown_or_untrainable_tiny_names_are_refused(tmp_path):
    for name in ("nosuch", "student-trained"):
        with pytest.raises(ValueError, match="unknown tiny model"):
            build_all(tmp_path, (name,))


def test_the_suite_serves_trained_teachers_untrained(tiny_models, monkeypatch):
    monkeypatch.setenv(UNTRAINED_ENV, "1")  # as conftest.py sets it
    assert resolve_model("tiny:qwen-trained") == str(tiny_models["qwen"])
