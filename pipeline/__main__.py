"""``python -m pipeline run SPEC``: the entrypoint ``ray job submit`` and the service launch.

Prints one JSON line per progress update and exits by the policy of ``pipeline.errors``: 0 on success, 2 on
invalid input, 1 on a failure during the run (``error: …`` on stderr, no traceback). ``RAY_ADDRESS`` (set by
``ray job submit``) selects the cluster.
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

    from pipeline.config import load_config
    from pipeline.errors import report
    from pipeline.spec import JobSpec

    try:
        spec = load_config(args.spec, JobSpec)
        from pipeline.run import plan_job, run_job

        plan = plan_job(spec, address=args.address)
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        manifest = run_job(spec, address=args.address, plan=plan,
                           on_progress=lambda p: print(json.dumps({"progress": p.model_dump(mode="json")}), flush=True))
    except Exception as exc:  # the one policy (pipeline.errors): `error: …`, 2 invalid input, 1 failed mid-run
        return report(exc)
    summary = manifest.model_dump(mode="json", include={"dataset", "dataset_hash", "counts"})
    print(json.dumps({"manifest": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
