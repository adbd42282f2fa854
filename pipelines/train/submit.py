"""Submitting a `lumiere` command to a running Ray cluster through the Ray Jobs API, and following its logs."""

from __future__ import annotations

import shlex
import time

from lumiere.errors import LumiereError


def strip_address(argv: list[str]) -> list[str]:
    """The same command line without --address (the job runs on the cluster, as a local driver there)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--address":
            skip = True
            continue
        if a.startswith("--address="):
            continue
        out.append(a)
    return out


def submit_and_follow(address: str, argv: list[str], poll_s: float = 1.0) -> int:
    """Submit `lumiere <argv>` (minus --address) as a Ray job, stream its logs, return its exit status."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # connection errors come in many types
        raise LumiereError(f"cannot reach the Ray Jobs API at {address}: {str(e).splitlines()[0]}") from None
    entrypoint = "lumiere " + " ".join(shlex.quote(a) for a in strip_address(argv))
    deadline = time.time() + 120
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint)
            break
        except RuntimeError as e:  # a just-started head answers 500 until its job agent is up
            if "No available agent" not in str(e) or time.time() > deadline:
                raise LumiereError(f"the Ray Jobs API at {address} refused the job: {str(e).splitlines()[0]}") from None
            time.sleep(2)
    print(f"[submit] job {job_id} on {address}: {entrypoint}", flush=True)
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            print(logs[shown:], end="", flush=True)
            shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            print(f"[submit] job {job_id} {status.value}", flush=True)
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(poll_s)
