"""vLLM in server mode: a separate ``vllm serve`` process (OpenAI-compatible API) with runtime
LoRA loading, for trainers and generators on different devices or nodes.

:class:`ServerProcess` starts and stops the server: loopback unless a host is named, always
behind an API key (runtime adapter loading lets anyone who can reach it load files from the
server's disk, so it is never left open; a random key per start when none is given), a port
chosen free and retried if another process takes it first, ``/health`` awaited, and a dead
server or a timeout turned into a clear error. :class:`VLLMServerEngine` is the rollout engine
on top: after each policy update the adapter is saved to a folder the server can read and
loaded under a new name via ``/v1/load_lora_adapter``; the previous version is unloaded.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..guards import end_process_group
from .base import Completion, EngineStats, RolloutEngine, SamplingConfig


class ServerError(RuntimeError):
    pass


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """One ``vllm serve`` process. ``extra_args`` are vLLM's own flags (model, LoRA, ...)."""

    PORT_TRIES = 3
    LAUNCHER = (sys.executable, "-m", "vllm.entrypoints.openai.api_server")

    def __init__(self, model: str, extra_args: list[str], *, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = "", log_path: str | Path | None = None, devices: str | None = None,
                 env: dict | None = None, startup_timeout: float = 300, request_timeout: float = 300,
                 launcher: tuple[str, ...] | None = None):
        # "" = a random key for this start; None = no key (a server that exposes no runtime
        # adapter loading, on loopback: `align serve` without --api-key)
        self.host, self.api_key = host, (api_key or secrets.token_urlsafe(24)) if api_key is not None else None
        self.request_timeout = request_timeout
        self._tmp = Path(tempfile.mkdtemp(prefix="align-server-"))
        self.log_path = Path(log_path) if log_path else self._tmp / "server.log"
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                    **(env or {})}
        self.env.pop("VLLM_API_KEY", None)  # an inherited key must not stand in for ours
        if self.api_key:
            self.env["VLLM_API_KEY"] = self.api_key
        if devices:  # e.g. "1": the server on GPU 1, the trainer on GPU 0
            self.env["CUDA_VISIBLE_DEVICES"] = devices
        self.proc, self._log = None, None
        launcher = launcher or self.LAUNCHER
        for attempt in range(self.PORT_TRIES if not port else 1):
            self.port = port or free_port(host)
            self.url = f"http://{host}:{self.port}"
            # The key goes in the child's environment (vLLM reads VLLM_API_KEY), never in argv:
            # a process's arguments are visible to every local user (`ps -ef`).
            self._start([*launcher, "--model", model, "--host", host, "--port", str(self.port), *extra_args])
            try:
                self._wait_healthy(startup_timeout)
                return
            except ServerError:
                # The port was free when chosen but another process may have bound it since.
                if "address already in use" not in self.tail().lower() or attempt + 1 == self.PORT_TRIES:
                    self.close(keep_log=True)  # the error names the log: it must still be there
                    raise

    def _start(self, cmd: list[str]) -> None:
        if self._log:
            self._log.close()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)

    def tail(self) -> str:
        try:
            return self.log_path.read_text()[-2000:]
        except OSError:
            return ""

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"vLLM server exited with code {self.proc.returncode} during start-up; "
                                  f"log {self.log_path}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200 and self.proc.poll() is None:  # ours, not whoever holds the port
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1)
        self._stop_process()
        raise ServerError(f"vLLM server not healthy after {timeout:.0f}s; log {self.log_path}:\n{self.tail()}")

    def post(self, path: str, payload: dict) -> dict | str:
        """POST JSON with the API key; HTTP errors become :class:`ServerError` with vLLM's text."""
        if self.proc.poll() is not None:
            raise ServerError(f"vLLM server died (exit {self.proc.returncode}); log {self.log_path}:\n{self.tail()}")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(payload).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as r:
                body = r.read().decode()
        except urllib.error.HTTPError as e:
            raise ServerError(f"vLLM server {path} -> HTTP {e.code}: {e.read().decode()[:500]}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise ServerError(f"vLLM server {path} failed: {e}; log {self.log_path}:\n{self.tail()}") from e
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body

    def _stop_process(self) -> None:
        if self.proc is not None:
            end_process_group(self.proc, grace=30)

    def close(self, keep_log: bool = False) -> None:
        self._stop_process()
        if self._log:
            self._log.close()
            self._log = None
        if not keep_log:
            shutil.rmtree(self._tmp, ignore_errors=True)


class VLLMServerEngine(RolloutEngine):
    name = "vllm-server"

    def __init__(self, base_path: str, tokenizer, *, dtype: str = "auto", device: str = "auto", host: str = "127.0.0.1",
                 port: int = 0, api_key: str = "", max_lora_rank: int = 8, max_model_len: int = 1024,
                 memory_fraction: float | None = None, seed: int = 0, startup_timeout: float = 300,
                 request_timeout: float = 300, base_name: str | None = None,
                 log_path: str | Path | None = None, devices: str | None = None):
        from ..placement import resolve_device, vllm_engine_args, vllm_server_args

        self.tok = tokenizer
        self.base_name = base_name or base_path
        self.stats = EngineStats()
        self.version, self._lora_name = -1, None
        # The server runs on the trainer's kind of device (its own GPUs with server_devices).
        args, notices = vllm_engine_args(base_path, device=resolve_device(device), dtype=dtype,
                                         lora_rank=max_lora_rank, max_loras=2, max_model_len=max_model_len,
                                         seed=seed, memory_fraction=memory_fraction, colocated=not devices)
        for notice in notices:
            print(f"notice: {notice}")
        self.dtype_name = args["dtype"]
        self._dir = Path(tempfile.mkdtemp(prefix="align-server-adapters-"))
        print(f"starting a vLLM server on {host} (~30 s on a CPU)", flush=True)
        self.server = ServerProcess(
            base_path, vllm_server_args(args) + ["--served-model-name", "base"],
            host=host, port=port, api_key=api_key, log_path=log_path, devices=devices,
            env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, startup_timeout=startup_timeout,
            request_timeout=request_timeout)
        self.url, self.proc = self.server.url, self.server.proc

    @classmethod
    def build(cls, opts, peft_model, tok) -> "VLLMServerEngine":
        from .. import distributed

        log = Path(opts.log_dir) / f"vllm-server-rank{distributed.rank()}.log" if opts.log_dir else None
        engine = cls(opts.base_path, tok, host=opts.host, api_key=opts.api_key, dtype=opts.dtype, device=opts.device,
                     max_lora_rank=opts.max_lora_rank, max_model_len=opts.max_model_len,
                     memory_fraction=opts.memory_fraction, seed=opts.seed,
                     base_name=opts.base_name, log_path=log, devices=opts.server_devices or None)
        engine.sync(peft_model, 0)
        return engine

    def sync(self, peft_model, version: int) -> None:
        from ..adapters import adapter_weights, save_adapter

        t0 = time.perf_counter()
        path = save_adapter(peft_model, self._dir / f"v{version}", self.base_name,
                            state_dict=adapter_weights(peft_model))  # gathered on every rank when sharded
        name, old = f"policy-v{version}", self._lora_name
        self.server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        self._lora_name, self.version = name, version
        if old is not None:
            self.server.post("/v1/unload_lora_adapter", {"lora_name": old})
            shutil.rmtree(self._dir / f"v{old.rsplit('-v', 1)[1]}", ignore_errors=True)
        self.stats.syncs += 1
        self.stats.sync_seconds.append(time.perf_counter() - t0)

    def generate(self, prompt_ids: list[list[int]], params: SamplingConfig) -> list[Completion]:
        t0 = time.perf_counter()
        payload = {"model": self._lora_name or "base", "prompt": prompt_ids, "max_tokens": params.max_new_tokens,
                   "temperature": 0.0 if params.greedy else params.temperature,
                   "top_p": 1.0 if params.greedy else params.top_p, "logprobs": 0,
                   "stop_token_ids": [self.tok.eos_token_id], "skip_special_tokens": False,
                   "return_tokens_as_token_ids": True}
        if params.seed is not None:
            payload["seed"] = params.seed
        elif params.row_seeds:  # one request, one seed: reproducible per batch, not per row
            payload["seed"] = int(params.row_seeds[0])
        res = self.server.post("/v1/completions", payload)
        out = []
        for p, choice in zip(prompt_ids, sorted(res["choices"], key=lambda c: c["index"])):
            toks = choice["logprobs"]["tokens"]
            ids = [int(t.split(":", 1)[1]) for t in toks]
            lps = [float(x) for x in choice["logprobs"]["token_logprobs"]]
            finished = choice["finish_reason"] == "stop"
            out.append(Completion(p, ids, finished, lps, text=self.tok.decode(ids, skip_special_tokens=True)))
        self.stats.generated_tokens += sum(len(c.token_ids) for c in out)
        self.stats.seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.close()
        shutil.rmtree(self._dir, ignore_errors=True)
