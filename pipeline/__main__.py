"""``python -m pipeline run SPEC``: the entrypoint ``ray job submit`` and the service launch.

Prints one JSON line per progress update and exits 0 on success, 2 on invalid input (message on stderr),
1 on a failure during the run. ``RAY_ADDRESS`` (set by ``ray job submit``) selects the cluster.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a distillation job")
    run.add_argument("spec", help="job spec, YAML or JSON")
    run.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or embedded)")
    args = parser.parse_args(argv)

    from pipeline.config import ConfigError, load_config
    from pipeline.spec import JobSpec

    try:
        spec = load_config(args.spec, JobSpec)
        from pipeline.run import run_job

        manifest = run_job(spec, address=args.address,
                           on_progress=lambda p: print(json.dumps({"progress": p.model_dump(mode="json")}), flush=True))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a failure mid-run: say what failed, leave the traceback to the logs
        print(f"error: job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    summary = manifest.model_dump(mode="json", include={"dataset", "dataset_hash", "counts"})
    print(json.dumps({"manifest": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
