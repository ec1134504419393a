"""`align serve`: an OpenAI-compatible vLLM server hosting the base and any number of exported
adapters by name, on one copy of the base (chat and completion endpoints).

A request names ``model``: the base by its name, or an adapter by the name it was given
(``--name N=PATH``, else its folder's name); an unknown name is vLLM's 404, never the base's
answer. Loopback unless ``--host`` says otherwise, and a host other than loopback needs
``--api-key``. Adapters are checked before anything starts: a different base, a reward model
(it does not generate), or a rank above ``--max-lora-rank`` is an error naming the adapter.
SIGTERM or Ctrl-C stops the server cleanly.
"""
from __future__ import annotations

import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# vLLM's own name for the base without any LoRA: not for requests mixed with adapters' ones
UNBATCHED_BASE = "base-without-lora"


class ServeError(ValueError):
    """An adapter or option `align serve` cannot use; the message names it."""


@dataclass
class Served:
    name: str
    path: Path
    rank: int


def plan(adapters: list[str], names: list[str], base: str | None, max_lora_rank: int = 0) -> tuple[str, list[Served], int]:
    """(the base, the adapters to serve, vLLM's max LoRA rank) -- or a ServeError before anything starts."""
    from .assets import resolve_model
    from .artifacts import ArtifactError, resolve
    from .placement import PlacementError, lora_rank_slot

    named = []
    for spec in names:
        if "=" not in spec:
            raise ServeError(f"--name '{spec}': expected NAME=PATH")
        named.append(tuple(spec.split("=", 1)))
    served, bases = [], {}
    for name, text in [(Path(a).name, a) for a in adapters] + named:
        try:
            t = resolve(text)
        except ArtifactError as e:
            raise ServeError(str(e)) from e
        if t.kind != "adapter":
            raise ServeError(f"'{text}' is a {'reward model' if t.kind == 'reward' else 'merged model'}: "
                             "`align serve` hosts LoRA adapters of a causal LM (serve a merged model with `vllm serve`)")
        import json

        rank = json.loads((t.path / "adapter_config.json").read_text())["r"]
        served.append(Served(name, t.path, rank))
        bases[resolve_model(base or t.base)] = t.base
    if len({s.name for s in served}) != len(served):
        raise ServeError(f"two adapters are named alike ({', '.join(s.name for s in served)}); use --name NAME=PATH")
    if len(bases) > 1:
        raise ServeError(f"the adapters sit on different bases ({', '.join(bases.values())}); one server hosts one base")
    top = max((s.rank for s in served), default=8)
    if max_lora_rank and top > max_lora_rank:
        worst = max(served, key=lambda s: s.rank)
        raise ServeError(f"adapter '{worst.name}' ({worst.path}) has rank {worst.rank}, above --max-lora-rank {max_lora_rank}")
    try:
        slot = lora_rank_slot(max_lora_rank or top)
    except PlacementError as e:
        raise ServeError(str(e)) from e
    return (base or (next(iter(bases.values())) if bases else "")), served, slot


def start(adapters: list[str], names: list[str] = (), *, base: str | None = None, host: str = "127.0.0.1",
          port: int = 0, api_key: str | None = None, max_lora_rank: int = 0, max_model_len: int = 0,
          dtype: str = "auto", device: str = "auto", memory_fraction: float | None = None, log_path=None):
    """Check everything, then start the server (a :class:`ServerProcess`); the caller stops it."""
    from .assets import resolve_model
    from .placement import resolve_device, standalone_dtype, vllm_engine_args, vllm_server_args
    from .rollout.vllm_engine import zero_adapter
    from .rollout.vllm_server import ServerProcess

    _check_exposure(host, api_key)
    base_name, served, slot = plan(adapters, list(names), base, max_lora_rank)
    if not base_name:
        raise ServeError("nothing to serve: name at least one adapter (or --base)")
    where = resolve_device(device)
    engine, notices = vllm_engine_args(resolve_model(base_name), device=where, dtype=standalone_dtype(dtype, where),
                                       lora_rank=slot if served else None, max_loras=len(served) + 1,
                                       max_model_len=max_model_len or None, memory_fraction=memory_fraction,
                                       colocated=False)
    for notice in notices:
        print(f"notice: {notice}")
    args = vllm_server_args(engine)
    zero = None
    if served and where.type == "cpu":  # the base's name goes to an all-zero adapter: vLLM's CPU build
        # answers no-LoRA requests batched with LoRA ones through an adapter (see vllm_engine.zero_adapter)
        zero = tempfile.TemporaryDirectory(prefix="align-serve-base-")
        args += ["--served-model-name", UNBATCHED_BASE, "--lora-modules",
                 f"{base_name}={zero_adapter(str(served[0].path), zero.name)}", *[f"{s.name}={s.path}" for s in served]]
    elif served:  # on a GPU the base answers without any LoRA: no zero adapter in its way
        args += ["--served-model-name", base_name, "--lora-modules", *[f"{s.name}={s.path}" for s in served]]
    else:
        args += ["--served-model-name", base_name]
    server = ServerProcess(resolve_model(base_name), args, host=host, port=port, api_key=api_key, log_path=log_path)
    server.keep = zero  # removed with the server object
    return server, base_name, served


def _check_exposure(host: str, api_key: str | None) -> None:
    if host not in LOOPBACK and not api_key:
        raise ServeError(f"--host {host} exposes the server beyond this machine: give --api-key-file "
                         "(or VLLM_API_KEY)")


def read_api_key(key_file: str | None, key: str | None, env=None) -> str | None:
    """The key from ``--api-key-file`` (readable by its owner alone: a key others can read is
    no secret), else ``--api-key`` (visible to every local user in `ps`), else the environment's
    ``VLLM_API_KEY`` (vLLM's own variable); None when none is given."""
    import os
    import stat

    env = os.environ if env is None else env
    if key_file:
        path = Path(key_file)
        try:
            mode = path.stat().st_mode
            text = path.read_text().strip()
        except OSError as e:
            raise ServeError(f"--api-key-file '{key_file}': cannot read it ({e.strerror})") from e
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ServeError(f"--api-key-file '{key_file}' can be read by other users (mode "
                             f"{stat.S_IMODE(mode):o}); make it private: chmod 600 {key_file}")
        if not text:
            raise ServeError(f"--api-key-file '{key_file}' is empty")
        return text
    return key or env.get("VLLM_API_KEY") or None


def port_free(host: str, port: int) -> bool:
    import socket

    if not port:
        return True
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def serve(adapters: list[str], names: list[str] = (), log=print, dry_run: bool = False, **kwargs) -> int:
    host, port = kwargs.get("host", "127.0.0.1"), kwargs.get("port", 0)
    if not port_free(host, port):
        raise ServeError(f"port {port} on {host} is in use by another program; choose another --port "
                         "(or --port 0 for any free one)")
    if dry_run:
        _check_exposure(host, kwargs.get("api_key"))
        base_name, served, _ = plan(adapters, list(names), kwargs.get("base"), kwargs.get("max_lora_rank", 0))
        log(f"dry run: would serve {base_name!r} and " + (", ".join(repr(s.name) for s in served) or "no adapter")
            + f" on {host}:{port or 'a free port'}; nothing was started")
        return 0
    server, base_name, served = start(adapters, names, **kwargs)
    stop = {"signum": None}

    def handle(signum, frame):
        stop["signum"] = signum

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    failed = False
    try:
        log(f"serving on {server.url}/v1 (OpenAI API): model names "
            + ", ".join([repr(base_name)] + [repr(s.name) for s in served]) +
            f"; log {server.log_path}; Ctrl-C or SIGTERM stops it")
        while stop["signum"] is None and server.proc.poll() is None:
            time.sleep(0.5)
        if server.proc.poll() is not None and stop["signum"] is None:
            failed = True
            log(f"the server exited with code {server.proc.returncode}; log {server.log_path} (kept):\n"
                f"{server.tail()}")
            return 1
        return 0
    finally:
        server.close(keep_log=failed)
        for s, h in previous.items():
            signal.signal(s, h)
