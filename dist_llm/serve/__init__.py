"""``dist-llm serve``: an OpenAI-compatible API (FastAPI) over our models, with dynamic batching
(:mod:`.scheduler`), model loading from checkpoints (:mod:`.model_loader`), a local uvicorn
server (:mod:`.server`) and a Ray Serve deployment of the same app (:mod:`.ray_backend`).

Imports stay lazy here so ``dist-llm --help`` does not pay for FastAPI or torch."""
