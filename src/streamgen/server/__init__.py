"""OpenAI-compatible serving, in-process: an ASGI app over a running Engine.

Mount it in an existing app (the engine is yours to start and stop)::

    engine = Engine()
    app = FastAPI(lifespan=...)            # starts / closes the engine
    app.mount("/llm", openai_app(engine))  # /llm/v1/chat/completions, ...

or run it alone: ``streamgen serve --port 8000`` (``standalone_app``, which owns its
engine through the ASGI lifespan). Any OpenAI client works against it::

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")

Needs the ``server`` extra (``pip install streamgen[server]``: starlette, pydantic,
prometheus-client, uvicorn).
"""

from streamgen.server.app import openai_app, standalone_app

__all__ = ["openai_app", "standalone_app"]
