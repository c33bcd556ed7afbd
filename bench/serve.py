"""``python -m bench.serve``: the same as ``scalellm bench`` (bench/serving/ has the code).

    python -m bench.serve --base-url http://127.0.0.1:8000 --num-prompts 128 --input-len 128 \
        --output-len 128 --max-concurrency 64
"""

from __future__ import annotations

import sys

from bench.serving.cli import main

if __name__ == "__main__":
    sys.exit(main())
