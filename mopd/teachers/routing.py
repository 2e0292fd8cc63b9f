"""Routing (MOPD 3.3; Uni-OPD B.1's table over teacher endpoints): each domain -> one teacher
client, built from `pipelines.yaml`'s `domains.<d>.teacher`:

- ``LocalTeacher``: the `teacher:<d>` stage's checkpoint, loaded in this process
  (``transport="inprocess"``) or started as a `mopd serve-teacher` subprocess for the duration of
  the caller's ExitStack (``transport="http"``), scored over HTTP like a remote one;
- ``PretrainedTeacher``: a finished teacher's folder or hub id, served as a local one is;
- ``RemoteTeacher``: an :class:`HTTPTeacher` over its endpoints (round-robin, failover), with the
  bearer token read from ``os.environ[token_env]``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mopd.settings.data import LocalTeacher, PretrainedTeacher, RemoteTeacher
from mopd.teachers.base import TeacherClient
from mopd.teachers.http import HTTPTeacher
from mopd.teachers.inprocess import InProcessTeacher
from mopd.teachers.launch import local_teacher_servers


# why: 8 parameters: the routes and local checkpoints, the transport and the stack that owns its
# servers, plus four transport options (padding id, server threads, vLLM serving settings and the
# largest top-k the stage will ask a vLLM server for).
def open_teachers(routes: dict[str, LocalTeacher | RemoteTeacher | PretrainedTeacher], local_dirs: dict[str, Path], *,
                  transport: str, stack: contextlib.ExitStack, pad_id: int = 0,
                  server_threads: int | None = None, vllm=None, topk: int | None = None) -> dict[str, TeacherClient]:
    """Domain -> client. ``local_dirs`` holds the checkpoint of every local domain; servers and
    clients are closed when ``stack`` closes. ``vllm``: the `teacher_vllm` settings
    (``transport="vllm"``). Errors name the domain and what is missing."""
    if transport not in ("inprocess", "http", "vllm"):
        raise ValueError(f"teacher_transport {transport!r}: expected 'inprocess', 'http' or 'vllm'")
    clients: dict[str, TeacherClient] = {}
    # a finished teacher (source: pretrained) is served exactly as a teacher stage's checkpoint:
    # the caller gives its folder (Config.teacher_model) in ``local_dirs`` like a stage's
    local = {d: r for d, r in routes.items() if r.source in ("local", "pretrained")}
    missing = sorted(d for d in local if d not in local_dirs)
    if missing:
        raise ValueError(f"no teacher checkpoint for local domain(s) {missing}")
    if transport == "vllm" and local:
        from mopd import runtime
        from mopd.teachers.vllm_serve import vllm_teacher_servers

        models = {d: local_dirs[d] for d in local}
        urls = {}
        if runtime.is_main():  # one set of servers; every data-parallel process scores against it
            urls = stack.enter_context(vllm_teacher_servers(models, vllm, dtype=runtime.current().dtype,
                                                            max_logprobs=topk or 0))
        urls = runtime.all_gather_json(urls)[0]
        names = {str(p): d for d, p in reversed(list(models.items()))}  # the server's name: its first domain
        for d in local:
            clients[d] = HTTPTeacher(d, [urls[d]], model=names[str(models[d])])
    elif transport == "http" and local:
        urls = stack.enter_context(local_teacher_servers({d: local_dirs[d] for d in local},
                                                         threads=server_threads))
        for d in local:
            clients[d] = HTTPTeacher(d, [urls[d]])
    elif local:
        loaded: dict[str, InProcessTeacher] = {}  # one model per distinct checkpoint
        for d in local:
            key = str(Path(local_dirs[d]).resolve())
            if key not in loaded:
                loaded[key] = InProcessTeacher.from_pretrained(local_dirs[d], name=d, pad_id=pad_id)
            clients[d] = loaded[key]
    for d, r in routes.items():
        if r.source == "remote":
            token = None
            if r.token_env:
                token = os.environ.get(r.token_env)
                if not token:
                    raise ValueError(f"domains.{d}.teacher.token_env: environment variable "
                                     f"{r.token_env!r} is unset or empty")
            clients[d] = HTTPTeacher(d, list(r.endpoints), model=r.model, token=token)
    for c in {id(c): c for c in clients.values()}.values():
        stack.callback(c.close)
    return clients
