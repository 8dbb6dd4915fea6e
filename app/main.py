"""The entry point behind `app.py`: settings, then build and launch; one line on bad input."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from storage import StorageError

from .service import ServiceError
from .settings import SettingsError, parse_settings


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
        from .launch import build_context, launch
        from .ui import build_demo

        demo = build_demo(settings, build_context(settings))
    except (SettingsError, ServiceError, StorageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch(demo, settings)
    return 0
