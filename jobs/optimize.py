"""Optimize a trained model (prune / bf16 / int8 / int4) and write its report.

Submit to a running cluster (from the repo root):

    ray job submit --working-dir . -- python jobs/optimize.py --config configs/tiny.yaml optimize.quantization=w8a8

Locally, the same file runs on a Ray instance it starts (same arguments; Ray is used only by the
optional recovery fine-tune). Extra arguments are `section.key=value` config overrides.
"""

import sys

from aigc_ray.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["optimize", *argv])


if __name__ == "__main__":
    sys.exit(main())
