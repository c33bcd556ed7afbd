"""python -m services.gateway: the OpenAI-compatible HTTP gateway."""

from services.gateway.server import main

if __name__ == "__main__":
    main()
