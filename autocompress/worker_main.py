"""Entry point of one worker process of `--workers N`: `python -m autocompress.worker_main JSON`.

Started by workers.spawn_workers; nothing imports this module. The JSON holds the search's options
(SearchSettings.options()) and the parent MLflow run the worker logs its trials under.
"""
from __future__ import annotations

import json
import sys

from .api import prepare
from .errors import UserError
from .memory import frozen_setup
from .orchestrate import run_worker
from .plan import PlanError
from .settings import SearchSettings


def main(argv: list[str] | None = None) -> int:
    payload = json.loads((argv if argv is not None else sys.argv[1:])[0])
    try:
        settings, ctx = prepare(SearchSettings.from_options(**payload["options"]))
        with frozen_setup():
            run_worker(settings, ctx, payload["parent_run_id"])
    except (UserError, PlanError) as e:
        print(f"autocompress worker: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
