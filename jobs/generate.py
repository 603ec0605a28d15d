"""Teachers-only job (answers to Parquet, no training):
`ray job submit --working-dir . -- python jobs/generate.py --config FILE`.

Runs directly too (`python jobs/generate.py`); without --config it uses the embedded local default.
"""

import sys

from avocado_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
