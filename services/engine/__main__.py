"""``python -m services.engine``: run one engine replica (settings from SCALELLM_* variables)."""

from services.engine.service import main

main()
