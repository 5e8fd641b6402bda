"""Run preprocess -> train -> serve -> sample requests, and print the summary.

Submit to a running cluster (from the repo root):

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/tiny.yaml

Locally, the same file runs on a Ray instance it starts: `python jobs/pipeline.py --config configs/tiny.yaml`.
Extra arguments are `section.key=value` config overrides.
"""

import sys

from aigc_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Under `ray job submit` the endpoint outlives this driver; locally it serves until Ctrl-C.
    return cli_main(["pipeline", "--keep-serving", *argv])


if __name__ == "__main__":
    sys.exit(main())
