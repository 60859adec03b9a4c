"""Debugger's StopTraining action for `rules-stop`: the training job asks SageMaker to stop itself.

A job that merely exits with an error ends Failed; Debugger's action called StopTrainingJob, so a stopped job
ended Stopped (its model and checkpoints kept, no alarm for a failure). Here the job calls StopTrainingJob on
its own name (TRAINING_JOB_NAME, which SageMaker sets in the container) with the execution role, then waits
for SageMaker's SIGTERM. Outside SageMaker, without the permission (sagemaker:StopTrainingJob on the job's own
ARN, docs/iam/execution-role-policy.json) or when no SIGTERM comes, the job ends Failed with the RuleStop as its
failure reason, as before, and a log line says why.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)
SIGTERM_WAIT_SECONDS = 120.0  # SageMaker sends SIGTERM at once; its SIGKILL comes 120 s later


def stop_own_job() -> bool:
    """True when SageMaker accepted StopTrainingJob for this job and sent SIGTERM: the job ends Stopped, so the
    caller should return normally. False (logged why): the caller ends the job as Failed."""
    name = os.environ.get("TRAINING_JOB_NAME")
    if not name:
        log.info("rules-stop: not running as a SageMaker training job (no TRAINING_JOB_NAME), so the job ends "
                 "Failed with the rule's finding as its reason")
        return False
    if os.environ.get("RANK", "0") != "0":  # rank 0 asks; the other ranks just end
        return False
    terminated = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    try:
        import boto3

        boto3.client("sagemaker").stop_training_job(TrainingJobName=name)
    except Exception as e:  # no region or credentials, AccessDenied, throttling, an endpoint without the API
        signal.signal(signal.SIGTERM, previous)
        log.warning("rules-stop: StopTrainingJob(%s) failed (%s: %s), so the job ends Failed instead of Stopped; "
                    "allow sagemaker:StopTrainingJob on the job's own ARN in the execution role "
                    "(docs/iam/execution-role-policy.json)", name, type(e).__name__, e)
        return False
    log.info("rules-stop: StopTrainingJob(%s) requested; waiting for SageMaker's SIGTERM (the job ends Stopped)",
             name)
    got = terminated.wait(SIGTERM_WAIT_SECONDS)
    signal.signal(signal.SIGTERM, previous)
    if not got:
        log.warning("rules-stop: no SIGTERM within %.0f s of StopTrainingJob(%s); ending the job as Failed",
                    SIGTERM_WAIT_SECONDS, name)
    return got
