"""Distillation job: `ray job submit --working-dir . -- python jobs/distill.py --config FILE`.

Runs directly too (`python jobs/distill.py`); without --config it uses the embedded local default.
"""

import sys

from avocado_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
