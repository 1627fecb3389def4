"""The server: ``python -m model.serve --model PATH`` (FastAPI + uvicorn), or on Ray Serve (``ray_app``).

Modules: ``protocol`` (messages, settings, limits), ``runner`` (the one place that calls the engine),
``sessions`` (registry, idle timeout), ``admission`` (memory estimates and the budget), ``metrics``
(Prometheus), ``logs`` (JSON lines), ``app`` (HTTP, WebSocket, the page), ``ray_app`` (Ray Serve),
``client`` (a small Python client used by the tests and the load generator).
Nothing is imported here, so ``python -m model.serve --help`` loads neither torch nor FastAPI.
"""
