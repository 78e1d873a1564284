"""How engine processes' OpenMP threads wait between ops (engine/managers/launch.py)."""

from __future__ import annotations

from radixfleet.engine.managers.launch import omp_wait_env


def test_default_sleeps_at_once(monkeypatch):
    """Robust when other processes share the cores (a spinning thread there waits for one
    that is not running)."""
    monkeypatch.delenv("RADIXFLEET_CPU_SPIN", raising=False)
    env: dict[str, str] = {}
    omp_wait_env(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_a_spin_count_opts_in(monkeypatch):
    monkeypatch.setenv("RADIXFLEET_CPU_SPIN", "1000000")
    env: dict[str, str] = {}
    omp_wait_env(env)
    assert env == {"GOMP_SPINCOUNT": "1000000"}


def test_the_callers_own_setting_wins(monkeypatch):
    monkeypatch.setenv("RADIXFLEET_CPU_SPIN", "5000")
    for own in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "7"}):
        env = dict(own)
        omp_wait_env(env)
        assert env == own
    env = {}
    omp_wait_env(env)
    assert env == {"GOMP_SPINCOUNT": "5000"}
