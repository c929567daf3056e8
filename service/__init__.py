"""The online scorer: FastAPI + onnxruntime behind a dynamic batching queue. Never imports torch.

app.py (factory, lifespan), settings.py, schemas.py, routers/, scoring.py (one request),
plan.py + encoding.py + item_rows.py (request -> model inputs), batcher.py, models.py (hot swap),
feature_store.py + redis_server.py (Redis), metrics.py, server.py (uvicorn).
"""
