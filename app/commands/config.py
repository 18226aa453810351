"""Show the settings in force and where they come from.

Site settings: ``<user config dir>/scopeside/config.toml`` (or $SCOPESIDE_CONFIG);
per project: ``<project>/scopeside.toml``.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_args(parser):
    parser.add_argument("--project", type=Path, default=None, help="project directory")
    parser.add_argument("--json", action="store_true", help="print JSON")


def main(args) -> int:
    from app.settings import load_settings, site_config_path

    s = load_settings(args.project)
    if args.json:
        print(json.dumps(s.model_dump(mode="json"), indent=2))
    else:
        print(f"# site config: {site_config_path()}")
        for section, values in s.model_dump(mode="json").items():
            print(f"[{section}]")
            for k, v in (values or {}).items():
                print(f"  {k} = {v!r}")
    return 0
