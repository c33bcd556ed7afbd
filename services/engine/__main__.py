"""``python -m services.engine``: run one engine replica (settings from SCALELLM_* variables)."""

import os

# Spinning OpenMP workers steal the cores that the gateway, tokenizers and
# detokenizers on the same host need. Measured with another process busy on
# one of the 2 cores: bf16 decode at batch 64 took 422 ms/step with OpenMP's
# default waiting, 185 ms with passive waiting. It must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from services.engine.service import main  # noqa: E402

main()
