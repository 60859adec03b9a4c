#!/usr/bin/env bash
# The programs outside Python that the tests and the demo need: install them, or say how, before anything runs.
#
#   scripts/system_deps.sh PROGRAM...           (make system-deps; PROGRAM: chromium, java)
#   scripts/system_deps.sh --check PROGRAM...   print the missing ones, one a line; exit 1 if any
#
# chromium renders the profiler report and the try-a-model page in the browser tests; java runs
# multi-model-server (local serving, the demo, the serving tests). With apt-get (Debian, Ubuntu) and root or
# passwordless sudo, the missing ones are apt-installed; elsewhere it exits 1 with one line naming each missing
# program and the command that installs it. Plain bash: it runs before .venv exists.
set -uo pipefail

check=
if [ "${1:-}" = --check ]; then check=1; shift; fi

package() {  # Debian's package for a program
  case "$1" in
    chromium) echo chromium ;;
    java) echo openjdk-17-jre-headless ;;
    *) echo "$1" ;;
  esac
}

present() {  # java: the command must also run (a dangling alternatives link is no Java)
  case "$1" in
    java) command -v java >/dev/null 2>&1 && java -version >/dev/null 2>&1 ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

missing() {
  local p
  for p in "$@"; do present "$p" || echo "$p"; done
}

mapfile -t absent < <(missing "$@")
if [ ${#absent[@]} -eq 0 ]; then exit 0; fi
if [ -n "$check" ]; then printf '%s\n' "${absent[@]}"; exit 1; fi

packages=()
for p in "${absent[@]}"; do packages+=("$(package "$p")"); done
names=$(IFS=,; echo "${absent[*]}")
names=${names//,/, }

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: $names not found: install with your package manager (on Debian: apt-get install -y ${packages[*]})" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ]; then
  as_root=(env)
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
  as_root=(sudo -n env)
else
  echo "error: $names not found: install with: sudo apt-get install -y ${packages[*]}" >&2
  exit 1
fi

echo "installing ${packages[*]} (apt-get) for $names" >&2
if ! out=$("${as_root[@]}" apt-get update -qq 2>&1 &&
           "${as_root[@]}" DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" 2>&1); then
  [ ${#out} -le 3000 ] || out=${out: -3000}
  echo "$out" >&2
  echo "error: apt-get install -y ${packages[*]} failed (above): install $names yourself" >&2
  exit 1
fi
mapfile -t still < <(missing "$@")
if [ ${#still[@]} -gt 0 ]; then
  echo "error: ${still[*]} still not found after apt-get install -y ${packages[*]}" >&2
  exit 1
fi
