"""Regression: update_weights_from_disk and load_lora_adapter read any folder a client names
(issue #20 item 4). ``LocalPathPolicy`` admits only the allowed roots, after resolving
symlinks and ``..``."""

from __future__ import annotations

import pytest

from radixfleet.engine.config import EngineConfig
from radixfleet.engine.managers.local_paths import LocalPathPolicy, PathNotAllowed


def test_only_the_model_folder_its_adapters_and_given_folders_are_allowed(tmp_path):
    model, trusted, extra, outside = (tmp_path / n for n in ("model", "trusted", "extra", "outside"))
    for d in (model / "adapters" / "x", trusted, extra, outside):
        d.mkdir(parents=True)
    policy = LocalPathPolicy.for_engine(str(model), [f"t={trusted}"], [str(extra)])
    for ok in (model, model / "adapters" / "x", trusted, extra / "y"):
        assert policy.check(str(ok), "lora_path") == str(ok)
    (model / "escape").symlink_to(outside)
    for bad in (outside, model / "escape", model / ".." / "outside", f"{model}-sibling", "/etc", "org/name"):
        with pytest.raises(PathNotAllowed, match="outside the allowed folders"):
            policy.check(str(bad), "lora_path")


def test_a_hub_snapshot_allows_the_repo_cache_folder(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "snapshots" / "rev1").mkdir(parents=True)
    (repo / "snapshots" / "rev2").mkdir(parents=True)
    policy = LocalPathPolicy.for_engine(str(repo / "snapshots" / "rev1"))
    assert policy.check(str(repo / "snapshots" / "rev2"), "model_path")
    with pytest.raises(PathNotAllowed):
        policy.check(str(tmp_path), "model_path")


def test_trust_remote_code_and_custom_logit_processors_are_off_by_default():
    config = EngineConfig(model_path="smollm2")
    assert config.trust_remote_code is False
    assert config.enable_custom_logit_processor is False
    assert config.allowed_local_paths is None
    assert EngineConfig(model_path="m", allowed_local_paths=["/a"]).allowed_local_paths == ("/a",)
