"""The ``radixfleet`` command: one entry point, one module per subcommand.

Each subcommand's module owns its flags; this file only dispatches, so that
``radixfleet router`` never imports torch and ``radixfleet serve`` never imports kopf.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, help line); the module exposes `main(argv: list[str]) -> int | None`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "model": ("radixfleet.engine.models.model_prep", "prepare the default model, download Hub models (`radixfleet model prepare|download`)"),
    "serve": ("radixfleet.engine.server.serve", "run one engine with its HTTP server"),
    "router": ("radixfleet.router.cli", "run the cache-aware router"),
    "up": ("radixfleet.router.fleet", "run a local fleet: N engine servers behind a router"),
    "operator": ("radixfleet.operator.main", "run the Kubernetes operator"),
}


def usage() -> str:
    lines = ["usage: radixfleet <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"radixfleet: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
