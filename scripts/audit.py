"""Known vulnerabilities in what the images install (what `make audit` runs).

    python scripts/audit.py [--lock requirements/lock/serve-cpu.txt ...] [--service pypi|osv] [--osv-url URL]

pip-audit checks each image lock (default: every image build's, audit.IMAGE_LOCKS, in requirements/lock/) against
the vulnerability service (default: PyPI's, which serves OSV's data; osv: api.osv.dev); then the Java libraries
bundled in multi-model-server's frontend jar are listed with the versions the jar records (netty, log4j, ...),
which no Python vulnerability service covers: compare them with the advisories yourself.

Exit status: 0 no known vulnerabilities; 1 known vulnerabilities (listed); 2 bad arguments, pip-audit missing
or failing; 3 the vulnerability service could not be reached (or audited nothing), so there is no verdict.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "code"))  # runs from a checkout without install too

from imgclf import audit  # noqa: E402
from imgclf.errors import UserError  # noqa: E402

log = logging.getLogger("audit")
LOCKS = ROOT / "requirements" / "lock"
SERVING_LOCK = LOCKS / "serve-cpu.txt"


def list_mms_jars(out) -> None:
    version, jars = audit.installed_jars("multi-model-server")
    locked = audit.locked_version(SERVING_LOCK, "multi-model-server") if SERVING_LOCK.is_file() else None
    print(f"Java libraries bundled in multi-model-server {version} (the serving image's lock pins {locked}):",
          file=out)
    if locked and locked != version:
        print(f"  note: this environment has {version}, the image gets {locked}: `make install` to match", file=out)
    if not jars:
        print("  no jar found in the installed package", file=out)
    for jar in jars:
        libraries, unversioned = audit.bundled_libraries(jar)
        print(f" {jar.name} ({jar}):", file=out)
        print(*audit.library_lines(libraries, unversioned), sep="\n", file=out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audit.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lock", action="append", type=Path, metavar="FILE",
                        help=f"a hashed lock to audit (repeat; default: {', '.join(audit.IMAGE_LOCKS)} in "
                             "requirements/lock/)")
    parser.add_argument("--service", choices=audit.SERVICES, default="pypi", help="vulnerability service of "
                        "pip-audit (default: pypi)")
    parser.add_argument("--osv-url", help="the OSV API's URL (with --service osv; default: pip-audit's)")
    parser.add_argument("--cache-dir", type=Path, help="pip-audit's HTTP cache (default: pip's)")
    parser.add_argument("--timeout", type=float, default=15, help="seconds per request (default: 15)")
    parser.add_argument("--no-jars", action="store_true", help="skip the listing of the Java libraries")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    locks = args.lock or [LOCKS / name for name in audit.IMAGE_LOCKS]

    code = 0
    try:
        for lock in locks:
            result = audit.audit_lock(lock, args.service, args.osv_url, args.cache_dir, args.timeout)
            print(*result.lines(), sep="\n", flush=True)
            code = code or (audit.EXIT_VULNERABLE if result.vulnerabilities else 0)
    except audit.ServiceUnreachable as e:
        log.error("%s", e)
        code = audit.EXIT_UNREACHABLE
    if not args.no_jars:
        list_mms_jars(sys.stdout)
    return code


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        sys.exit(main())
    except UserError as e:
        log.error("%s", e)
        sys.exit(2)
