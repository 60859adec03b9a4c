#!/usr/bin/env bash
# `docker run` detached, its output followed, its exit status returned: make local-train and local-serve.
#
#   containers/run_container.sh ENGINE [run options] IMAGE [ARGS]     (ENGINE: docker, podman, "sudo docker")
#
# Ctrl-C or SIGTERM stops the container as SageMaker does (SIGTERM, then SIGKILL 30 s later: a training job
# writes its checkpoint), removes it, and exits 130 (143 for SIGTERM). Detached and polled with `inspect`,
# because podman's Docker API service spins a core while a client stays attached to a container or blocks in
# `docker wait` (docs/images.md).
#
# Two traps this avoids (issue 32, measured):
# - bash cannot trap a signal that was ignored when it started, and a background job of a script starts with
#   SIGINT ignored: the script then ignored Ctrl-C while the docker CLIs (Go, which catch SIGINT anyway) died,
#   and the container ran on. So the script restarts itself with SIGINT and SIGTERM at their defaults.
# - the docker CLI catches SIGINT and exits 1 rather than dying of it; when that happens to the command bash
#   waits for, bash assumes the command handled Ctrl-C and skips its own INT trap. So the engine commands run in
#   their own session (setsid), out of reach of the terminal's Ctrl-C: only this script acts on it.
set -uo pipefail
if [ -z "${RUN_CONTAINER_SIGNALS:-}" ] && env --default-signal=INT true 2>/dev/null; then
  RUN_CONTAINER_SIGNALS=1 exec env --default-signal=INT,TERM "$0" "$@"
fi
engine=$1
shift
if command -v setsid >/dev/null; then shielded=(setsid -w); else shielded=(); fi
out=$(mktemp)
# An engine command in the background, in its own session; its stdout in $out. Waited for with `wait`, which a
# signal cuts short (status > 128) and whose trap then runs, where bash would defer a trap until a foreground
# command ended, or skip it when that command caught the signal itself (the docker CLI does).
ask() { "${shielded[@]}" $engine "$@" >"$out" & asked=$!; wait "$asked"; }
finish() { while kill -0 "$asked" 2>/dev/null; do wait "$asked"; done; wait "$asked"; }  # its status, signals or not

signal=
trap 'signal=${signal:-130}' INT
trap 'signal=${signal:-143}' TERM
trap 'rm -f "$out"' EXIT
ask run -d "$@" || finish || exit $?
cid=$(<"$out")
trap '"${shielded[@]}" $engine rm -f "$cid" >/dev/null 2>&1; rm -f "$out"' EXIT
"${shielded[@]}" $engine logs -f "$cid" &
logs=$!

# Until the container ends or a signal comes. A failed `inspect` (the engine busy or restarting) is asked again.
failures=0
while [ -z "$signal" ]; do
  if ask inspect --format '{{.State.Running}}' "$cid" 2>/dev/null; then running=$(<"$out"); else running=; fi
  case "$running" in
    true) failures=0 ;;
    false) break ;;
    *) [ -n "$signal" ] || failures=$((failures + 1)); [ "$failures" -lt 10 ] || break ;;
  esac
  [ -n "$signal" ] || { sleep 1 & wait $!; }  # a signal interrupts `wait` at once, where it would wait for sleep
done

if [ -n "$signal" ]; then
  trap '' INT TERM  # a second Ctrl-C does not cut the stop short: the container gets its 30 s
  started=$SECONDS
  echo "run_container.sh: stopping ${cid:0:12} (SIGTERM, SIGKILL after 30 s)" >&2
  "${shielded[@]}" $engine stop -t 30 "$cid" >/dev/null 2>&1
  "${shielded[@]}" $engine rm -f "$cid" >/dev/null 2>&1
  echo "run_container.sh: ${cid:0:12} stopped and removed in $((SECONDS - started)) s" >&2
  kill "$logs" 2>/dev/null
  exit "$signal"
fi
wait "$logs"
exit "$("${shielded[@]}" $engine inspect --format '{{.State.ExitCode}}' "$cid" 2>/dev/null || echo 1)"
