"""Models from the Hugging Face Hub, end to end: a local Hub look-alike (tests/hub_server.py,
a real HTTP server) serves the default model's files and HF_ENDPOINT points at it; each test
has its own HF_HOME. The engine downloads what it reads (no .bin/.gguf/ONNX decoys), serves
the same greedy text as from the local folder, resumes a download cut off mid-file, explains a
wrong token or a missing repo, and works offline from the cache."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hub_server import HubServer
from server_process import engine_server

from radixfleet.engine.engine import Engine
from radixfleet.engine.models.hub import HubError, download_model, is_repo_id
from radixfleet.engine.models.model_prep import embedding_model_dir, resolve_model_path

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
TOKENIZER_REPO = "org/smollm2-tokenizer"
GATED = "org/gated-smollm2"
EMBED_REPO = "sentence-transformers/all-MiniLM-L6-v2"
RIGHT_TOKEN = "hf_right_token_0123"
# What a Hub repo ships besides safetensors; the engine must never fetch these.
DECOYS = {"pytorch_model.bin": b"\0" * 512, "model.gguf": b"GGUF", "onnx/model.onnx": b"onnx",
          "original/consolidated.00.pth": b"pth", "consolidated.safetensors": b"{}"}
PROMPT = "The capital of France is"
SAMPLING = {"temperature": 0, "max_new_tokens": 16}
ENGINE_ARGS = {"max_total_tokens": 4096, "random_seed": 0}

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def hub(model_dir):
    with HubServer() as server:
        server.add_repo(REPO, model_dir, extra_files=DECOYS)
        server.add_repo(TOKENIZER_REPO, model_dir)
        server.add_repo(GATED, model_dir, token=RIGHT_TOKEN)
        server.add_repo(EMBED_REPO, embedding_model_dir())
        yield server


@pytest.fixture
def hub_cache(hub, tmp_path, monkeypatch) -> Path:
    """HF_ENDPOINT at the test Hub, a fresh HF_HOME, no token, online; returns the Hub cache."""
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    hub.requests.clear()
    return tmp_path / "hf-home" / "hub"


@pytest.fixture(scope="module")
def local_answer(model_dir) -> str:
    """The greedy text for PROMPT from the local folder: what a Hub copy must answer too."""
    with Engine(model_path=model_dir, **ENGINE_ARGS) as engine:
        return engine.generate(PROMPT, SAMPLING)["text"]


def files(folder: str | Path) -> list[str]:
    root = Path(folder)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def snapshots(cache: Path, repo: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots"


def test_engine_downloads_a_hub_model_and_answers_like_the_local_folder(hub, hub_cache, local_answer, model_dir):
    with Engine(model_path=REPO, revision="main", tokenizer_path=TOKENIZER_REPO, **ENGINE_ARGS) as engine:
        text = engine.generate(PROMPT, SAMPLING)["text"]
        model_path, tokenizer_path = Path(engine.model_path), Path(engine.config.tokenizer_path)
    assert text == local_answer
    assert model_path.parent == snapshots(hub_cache, REPO)
    # Exactly the engine's files (safetensors, config, tokenizer, chat template), none of the decoys.
    assert files(model_path) == files(model_dir)
    assert filecmp.cmp(model_path / "model.safetensors", Path(model_dir) / "model.safetensors", shallow=False)
    assert not [r for r in hub.requests if any(r.path.endswith(d) for d in DECOYS)]
    # A Hub tokenizer_path brings the tokenizer's files only, never the weights next to them.
    assert tokenizer_path.parent == snapshots(hub_cache, TOKENIZER_REPO)
    assert "tokenizer.json" in files(tokenizer_path) and "model.safetensors" not in files(tokenizer_path)
    assert not [r for r in hub.gets("model.safetensors") if r.path.startswith(f"/{TOKENIZER_REPO}/")]


def test_interrupted_download_resumes_and_serve_answers(hub, hub_cache, tmp_path, local_answer, model_dir):
    """`radixfleet serve --revision --download-dir`: the weights' connection drops a third of
    the way in once; the download resumes from there (a Range request) and completes."""
    size = (Path(model_dir) / "model.safetensors").stat().st_size
    hub.cut_once("model.safetensors", size // 3)
    download_dir = tmp_path / "downloads"
    with engine_server(REPO, "--revision", "main", "--download-dir", str(download_dir), timeout=300) as url:
        out = httpx.post(f"{url}/generate", json={"text": PROMPT, "sampling_params": SAMPLING}, timeout=120).json()
    assert out["text"] == local_answer
    first, *resumed = hub.gets("model.safetensors")
    assert first.range is None and len(resumed) == 1, hub.gets("model.safetensors")
    offset = int(resumed[0].range.removeprefix("bytes=").split("-")[0])
    assert 0 < offset <= size // 3
    (snapshot,) = snapshots(download_dir, REPO).iterdir()
    assert filecmp.cmp(snapshot / "model.safetensors", Path(model_dir) / "model.safetensors", shallow=False)
    assert not list(download_dir.rglob("*.incomplete"))
    assert not hub_cache.exists(), "--download-dir replaces the Hub cache"


def test_a_wrong_token_names_the_repo_and_the_token(hub, hub_cache, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_4567")
    with pytest.raises(HubError) as err:
        Engine(model_path=GATED, **ENGINE_ARGS)
    message = str(err.value)
    assert f"refused access to {GATED} (401)" in message
    assert "the token in HF_TOKEN (hf_...4567)" in message and "hf_wrong_token_4567" not in message
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match=r"with no token \(HF_TOKEN is not set\)"):
        download_model(GATED, weights=False)
    monkeypatch.setenv("HF_TOKEN", RIGHT_TOKEN)
    assert "config.json" in files(download_model(GATED, weights=False))


def test_a_missing_repo_or_revision_is_a_clear_error(hub, hub_cache):
    with pytest.raises(HubError, match=rf"org/no-such-model was not found on {hub.url} \(404\)"):
        Engine(model_path="org/no-such-model", **ENGINE_ARGS)
    with pytest.raises(HubError, match=rf"{REPO} has no revision 'v9'"):
        Engine(model_path=REPO, revision="v9", **ENGINE_ARGS)
    # `radixfleet serve` says so on stderr and exits 1, without a traceback.
    proc = subprocess.run([sys.executable, "-m", "radixfleet", "serve", "--model-path", "org/no-such-model"],
                          capture_output=True, text=True, timeout=180, env=os.environ)
    assert proc.returncode == 1, proc.stderr
    assert "radixfleet serve: org/no-such-model was not found on" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_embedding_model_from_the_hub_offline_uses_the_cache_or_says_it_is_missing(hub, hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as err:
        Engine(model_path=EMBED_REPO)
    assert f"HF_HUB_OFFLINE is set and {EMBED_REPO} (revision main) is not complete in the cache {hub_cache}" in str(err.value)
    assert hub.requests == []
    # `radixfleet model download` with the network, then the engine offline from the cache.
    online = {**os.environ, "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run([sys.executable, "-m", "radixfleet", "model", "download", EMBED_REPO],
                          capture_output=True, text=True, timeout=180, env=online)
    assert proc.returncode == 0, proc.stderr
    snapshot = proc.stdout.strip().splitlines()[-1]
    assert Path(snapshot).parent == snapshots(hub_cache, EMBED_REPO)
    hub.requests.clear()
    with Engine(model_path=EMBED_REPO) as engine:
        assert engine.model_path == snapshot
        vector = engine.encode("Hello, world!")["embedding"]
    assert hub.requests == [], "offline: the Hub is never asked"
    with Engine(model_path="all-minilm-l6-v2") as local:
        reference = local.encode("Hello, world!")["embedding"]
    assert max(abs(a - b) for a, b in zip(vector, reference, strict=True)) < 1e-5


def test_a_local_folder_or_an_alias_wins_over_the_hub(hub, hub_cache, tmp_path, monkeypatch, model_dir):
    (tmp_path / REPO).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(REPO) == REPO  # the relative folder of that name
    assert resolve_model_path("smollm2") == model_dir
    assert hub.requests == []
    assert is_repo_id(REPO) and is_repo_id("org/model-v1.5_x")
    assert not any(is_repo_id(p) for p in ("smollm2", "/models/llama", "./org/name", "a/b/c", "org/"))
