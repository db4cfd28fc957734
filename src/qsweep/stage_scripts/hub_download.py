"""Download a model snapshot from the Hugging Face hub into a directory (where a hub is reachable).

Runs in a stage environment with huggingface_hub; imports nothing from qsweep.
Usage: python hub_download.py REPO_ID OUT_DIR [--revision REV]
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("repo_id")
    parser.add_argument("out_dir")
    parser.add_argument("--revision", default=None)
    args = parser.parse_args()
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            args.repo_id,
            revision=args.revision,
            local_dir=args.out_dir,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
        )
    except Exception as err:  # the controller turns this line into its one-line error
        print(f"HUB-ERROR: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
