"""A prepared default model is used without writing anything (issue #17: in the container
image the baked model cache is read-only, and ``prepare_default_model`` opened its conversion
lock file there for writing before looking whether the model was ready)."""

from __future__ import annotations

from radixfleet.engine.models import model_prep


def test_a_prepared_model_needs_no_writable_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RADIXFLEET_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    # Tests run as root, which file modes do not stop: a folder where the lock file would go
    # makes opening it fail as a read-only filesystem does.
    (tmp_path / "models" / ".SmolLM2-135M-Instruct.lock").mkdir()
    assert model_prep.prepare_default_model() == folder
