"""The ``RADIXFLEET_*`` environment variables: one registry (``env_vars.py``), read through it
everywhere, and listed in the README exactly as registered."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from radixfleet import env_vars

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"RADIXFLEET_[A-Z0-9_]*[A-Z0-9]")
# A read of the environment that names a RADIXFLEET_ variable itself (setting one is fine).
DIRECT_READ = re.compile(r"""(getenv|environ\.get|environ\[)\(?\s*["']RADIXFLEET_""")


def _default_text(var: env_vars.EnvVar) -> str:
    if var.default is None:
        return "unset"
    if var.kind == "bool":
        return "`1`" if var.default else "`0`"
    if var.kind == "float":
        return f"`{var.default:g}`"
    if var.kind == "json":
        return f"`{json.dumps(var.default)}`"
    return f"`{var.default}`"


def readme_table() -> str:
    rows = ["| variable | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{v.name}` | {v.kind} | {_default_text(v)} | {v.help} |" for v in env_vars.REGISTRY.values()]
    return "\n".join(rows)


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.splitlines() if (ROOT / p).is_file()]


def test_the_readme_table_is_the_registry():
    table = readme_table()
    assert table in (ROOT / "README.md").read_text(), f"README.md should hold this table:\n{table}"


def test_every_variable_named_in_the_tree_is_registered():
    named: dict[str, str] = {}
    for path in _tracked_files():
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".sh", ".tpl", ""} or path.name == "Dockerfile":
            for name in NAME.findall(path.read_text(errors="replace")):
                named.setdefault(name, str(path.relative_to(ROOT)))
    unknown = {n: p for n, p in named.items() if n not in env_vars.REGISTRY}
    assert not unknown, f"add these to env_vars.py: {unknown}"


def test_code_reads_the_variables_only_through_the_registry():
    direct = [f"{p.relative_to(ROOT)}:{i}" for p in _tracked_files() if p.suffix == ".py" and p.name != "env_vars.py"
              for i, line in enumerate(p.read_text().splitlines(), 1) if DIRECT_READ.search(line)]
    assert not direct, f"read these through radixfleet.env_vars: {direct}"


def test_values_parse_by_kind(monkeypatch):
    assert env_vars.PDL.get() is True and env_vars.API_KEY.get() is None
    for raw, value in (("0", False), ("off", False), ("TRUE", True), ("", True)):
        monkeypatch.setenv("RADIXFLEET_PDL", raw)
        assert env_vars.PDL.get() is value, raw
    monkeypatch.setenv("RADIXFLEET_GEMV_ROWS_TABLE", '{"4096,4096,0": [2, 4, 8]}')
    assert env_vars.GEMV_ROWS_TABLE.get() == {"4096,4096,0": [2, 4, 8]}
    monkeypatch.setenv("RADIXFLEET_START_TIMEOUT", "12.5")
    assert env_vars.START_TIMEOUT.get() == 12.5


@pytest.mark.parametrize("var, raw", [(env_vars.PDL, "maybe"), (env_vars.GEMV_ROWS_MAX_K, "lots"),
                                      (env_vars.GEMV_ROWS_TABLE, "{not json")])
def test_a_bad_value_names_the_variable(monkeypatch, var, raw):
    monkeypatch.setenv(var.name, raw)
    with pytest.raises(ValueError, match=var.name):
        var.get()


def test_the_registry_imports_without_torch():
    code = "import sys; import radixfleet.env_vars; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert done.stdout.strip() == "False"
