"""What every config section shares, and the constants the config's defaults and checks need.

The config package sits at the bottom of the import graph: it imports nothing else of avocado_ray, and the modules
that act on these values (dataplane/prompts.py, models/tiny.py, routing/classifier.py) import them from here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

DOMAINS = ("code", "chinese", "math", "general", "multimodal")
Domain = Literal["code", "chinese", "math", "general", "multimodal"]

MAX_PROMPT_BYTES = 1 << 20  # default limit of one input row, as UTF-8 JSON: far beyond any teacher's context
TINY_SCHEME = "tiny:"  # a locally built tiny model (models/tiny.py)
HUB_SCHEME = "hf:"  # a hub model id, fetched where it runs (token from HF_TOKEN in the environment only)
CLASSIFIER_ENTRY_POINTS = "avocado_ray.classifiers"  # entry-point group of installable domain classifiers


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
