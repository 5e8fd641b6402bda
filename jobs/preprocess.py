"""Preprocess a corpus into parquet shards with Ray Data.

Submit to a running cluster (from the repo root):

    ray job submit --working-dir . -- python jobs/preprocess.py --config configs/tiny.yaml

Locally, the same file runs on a Ray instance it starts: `python jobs/preprocess.py --config configs/tiny.yaml`.
Extra arguments are `section.key=value` config overrides.
"""

import sys

from aigc_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["preprocess", *argv])


if __name__ == "__main__":
    sys.exit(main())
