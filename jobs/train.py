"""Trainer-only job on teacher samples already on disk:
`ray job submit --working-dir . -- python jobs/train.py --config FILE --data RUN/samples`.
"""

import sys

from avocado_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
