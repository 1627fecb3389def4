"""Scale-out on Ray Serve: one replica per GPU, a session on one replica, its requests routed there.

    serve run model.serve.ray_app:app                                    # defaults, $QWEN_MODEL_PATH
    serve run model.serve.ray_app:build_app model=/path/to/Qwen2.5-VL-3B-Instruct replicas=4 memory_gib=100
    python -m model.serve --ray --model /path --replicas 4               # the same from the CLI

Each replica (``StreamServer``) is the plain server (``app.build_app``) over its own copy of the
model; a session id starts with its replica's id. Affinity is Ray Serve's request-router API:
``SessionRouter`` sends a request that carries the header ``x-session-id: <id>`` (Ray Serve's
session header) to the replica whose id the session id starts with, so the WebSocket of a
session is held by the replica that owns it and every HTTP request for it reaches the same
replica. A request whose session's replica is gone goes to any live replica, which answers 410
"session lost" at once (never a hang); the other replicas' sessions are untouched. New sessions go
to the replicas with the most free session memory (each replica reports it as its routing stats),
among them by queue length.
``GET /v1/sessions`` lists the sessions of every replica (a broadcast to all of them).

Browsers cannot put a header on a WebSocket: under Ray Serve the page uses HTTP (frames by POST,
answers as server-sent events) with the header, which it learns from ``GET /v1/info``.
"""
from __future__ import annotations

import argparse
import logging
import random
import time
from typing import Any, Optional

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

SESSION_HEADER = "x-session-id"  # Ray Serve's default session header (RAY_SERVE_SESSION_ID_HEADER_KEY)
DEPLOYMENT = "StreamServer"
log = logging.getLogger("model.serve")


def owner_of(sid: str) -> str:
    """The replica id a session id starts with ('' when it has none)."""
    return sid.rsplit("-", 1)[0] if "-" in sid else ""


class SessionRouter(RequestRouter):
    """Session affinity: a request naming a session goes to the replica that holds it.

    Requests without a session (creating one, listing) go first to the replicas with the most
    free session memory in their last report (Ray Serve picks among them by queue length); a
    session whose replica is no longer among the live ones goes to any replica, which answers
    "session lost".
    """

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        sid = pending_request.metadata.session_id if pending_request is not None else ""
        if sid:
            owner = owner_of(sid)
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == owner:
                    return [[replica]]
            return [candidate_replicas]  # its replica is gone: any live one says "session lost"
        # New sessions (and lists, health): first the replicas with at least half the largest free memory any
        # reported, then the rest; within a group Ray Serve picks by queue length (ties at random), so a burst of
        # new sessions spreads over the replicas between two reports.
        free = {r.replica_id: (r.routing_stats or {}).get("free_bytes", 0) for r in candidate_replicas}
        most = max(free.values())
        roomy = [r for r in candidate_replicas if free[r.replica_id] * 2 >= most]
        rest = [r for r in candidate_replicas if free[r.replica_id] * 2 < most]
        for group in (roomy, rest):
            random.shuffle(group)  # Ray Serve takes the first of equal queue lengths
        return [group for group in (roomy, rest) if group]


class RayCluster:
    """The cluster hooks of one replica's app: the routing header and the list of every replica's sessions."""

    route_header = SESSION_HEADER

    def __init__(self, registry, app_name: str):
        self.registry, self.app_name = registry, app_name
        self._handle = None

    async def list_sessions(self) -> list[dict]:
        if self._handle is None:
            self._handle = serve.get_deployment_handle(DEPLOYMENT, self.app_name)
        replies = await self._handle.broadcast("local_sessions").results_async(timeout_s=10, return_exceptions=True)
        out = []
        for reply in replies:
            if isinstance(reply, BaseException):
                log.warning("a replica did not list its sessions", extra={"fields": {"event": "list_failed",
                                                                                     "error": repr(reply)}})
                continue
            out.extend(reply)
        return out


@serve.deployment(
    max_ongoing_requests=1024,  # an open WebSocket is an ongoing request
    request_router_config=RequestRouterConfig(request_router_class=SessionRouter, request_routing_stats_period_s=2.0),
    health_check_period_s=2.0,
)
@serve.ingress()
class StreamServer:
    """One replica: the model, its sessions and the server app over them."""

    def __init__(self, argv: list[str]):
        from ..loading import load_engine
        from . import logs
        from .__main__ import parse_args, server_config
        from .app import build_app

        args = parse_args(argv)
        config = server_config(args)
        logs.setup(args.log_level)
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        engine, description = load_engine(args.model, dtype=args.dtype, device=args.device)
        model, processor = engine.model, engine.processor
        engine.close()
        self.asgi = build_app(model, processor, config, f"{description} (replica {self.replica})",
                              id_prefix=f"{self.replica}-",
                              cluster_factory=lambda registry: RayCluster(registry, context.app_name))
        self.registry = self.asgi.state.registry

    def __serve_build_asgi_app__(self):
        return self.asgi

    async def local_sessions(self) -> list[dict]:
        return [{**s.summary(), "replica": self.replica} for s in self.registry.sessions()]

    def record_routing_stats(self) -> dict[str, Any]:
        admission = self.registry.admission
        return {"free_bytes": admission.budget_bytes - admission.reserved_bytes, "sessions": len(self.registry),
                "time": time.time()}


def build_app(args: dict) -> "serve.Application":
    """The Ray Serve application. ``args``: the CLI's flags as ``name=value`` (``serve run ... model=/path``).

    replicas: default one per GPU of the cluster (1 without GPUs); each replica takes one GPU when
    the device is CUDA (the default wherever the cluster has GPUs).
    """
    import ray

    from .__main__ import parse_args, server_config

    argv, env = [], {}
    for key, value in args.items():
        if key == "api_key":  # to the replicas through their environment, not their arguments
            env["SERVE_API_KEY"] = str(value)
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            if str(value).lower() == "true":
                argv.append(flag)
            elif key in ("warmup", "pool"):  # the flags that are on unless turned off
                argv.append(f"--no-{key}")
        else:
            argv += [flag, str(value)]
    parsed = parse_args(argv)
    server_config(parsed)  # refuse bad flags here, before any replica starts
    gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
    cuda = parsed.device == "cuda" or (parsed.device is None and gpus > 0)
    replicas = parsed.replicas or max(1, gpus)
    options = {"num_gpus": 1} if cuda else {"num_cpus": 0.5}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return StreamServer.options(num_replicas=replicas, ray_actor_options=options).bind(argv)


def serve_forever(args: argparse.Namespace, config) -> int:
    """``python -m model.serve --ray``: start (or join, with RAY_ADDRESS) a Ray cluster and serve until Ctrl-C."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # where `model` lives
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    local = args.host in ("127.0.0.1", "localhost", "::1") and not os.environ.get("RAY_ADDRESS")
    ray.init(address=None, ignore_reinit_error=True, runtime_env={"env_vars": {"PYTHONPATH": path}},
             **({"_node_ip_address": "127.0.0.1"} if local else {}))  # a local-only server keeps Ray on loopback
    serve.start(http_options={"host": args.host, "port": args.port})
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("ray", "host", "port")}
    serve.run(build_app(flags), name="vsq", route_prefix="/")
    log.info("serving on Ray Serve", extra={"fields": {"event": "ray_serving", "host": args.host, "port": args.port}})
    try:  # Ctrl-C; SIGTERM is taken by Ray's own handler, which ends the process (the local cluster with it)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0




def __getattr__(name: str):
    if name == "app":
        return build_app({})
    raise AttributeError(name)
