"""Batch generation: a prompts dataset (jsonl/parquet) -> parquet of completions.

Submit to a running cluster (from the repo root):

    ray job submit --working-dir . -- python jobs/generate.py --config configs/tiny.yaml generate.inputs=[prompts.jsonl]

Locally, the same file runs on a Ray instance it starts (same arguments).
Extra arguments are `section.key=value` config overrides.
"""

import sys

from aigc_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["generate", *argv])


if __name__ == "__main__":
    sys.exit(main())
