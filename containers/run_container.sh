#!/usr/bin/env bash
# `docker run` detached, its output followed, its exit status returned: make local-train and local-serve.
#
#   containers/run_container.sh ENGINE [run options] IMAGE [ARGS]     (ENGINE: docker, podman, "sudo docker")
#
# Ctrl-C or SIGTERM stops the container as SageMaker does: SIGTERM, then SIGKILL 30 s later (a training job
# writes its checkpoint). Detached and polled with `inspect`, because podman's Docker API service spins a core
# while a client stays attached to a container or blocks in `docker wait` (docs/images.md).
set -uo pipefail
engine=$1
shift
cid=$($engine run -d "$@") || exit $?
trap '$engine stop -t 30 "$cid" >/dev/null 2>&1 &' INT TERM
trap '$engine rm -f "$cid" >/dev/null 2>&1' EXIT
$engine logs -f "$cid" &
while [ "$($engine inspect --format '{{.State.Running}}' "$cid" 2>/dev/null)" = true ]; do
  sleep 1 & wait $!  # a signal interrupts `wait` at once, where it would wait for a foreground sleep
done
wait  # the log follower and a stop in progress
exit "$($engine inspect --format '{{.State.ExitCode}}' "$cid" 2>/dev/null || echo 1)"
