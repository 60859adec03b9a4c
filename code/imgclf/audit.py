"""`make audit` (scripts/audit.py): known vulnerabilities in what the images install.

Two parts:
- pip-audit over the image locks (requirements/lock/*.txt: fully pinned and hashed, so pip resolves nothing);
- the Java libraries bundled in multi-model-server's frontend jar (a fat jar: the serving image's only Java code
  besides the JRE), with the versions the jar records. No Python vulnerability service covers them.

pip-audit says "No known vulnerabilities found" and exits 0 when it could audit nothing (each package skipped as
"not found", e.g. behind an index mirror that lacks PyPI's per-release JSON): that counts here as unreachable.
"""

from __future__ import annotations

import configparser
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.errors import UserError

IMAGE_LOCKS = ("train-cpu.txt", "train-gpu.txt", "train-gpu-cu128.txt", "serve-cpu.txt",  # every image build's
               "serve-gpu.txt")
SERVICES = ("pypi", "osv")
EXIT_VULNERABLE = 1  # pip-audit found known vulnerabilities
EXIT_UNREACHABLE = 3  # the vulnerability service could not be reached (or audited nothing): no verdict
# How pip-audit's last line of stderr names a service it could not use (requests' errors, its own ServiceError).
UNREACHABLE = re.compile(r"ConnectionError|ProxyError|SSLError|Timeout|ServiceError|Max retries exceeded|"
                         r"Could not connect|Name or service not known|NameResolutionError")


class ServiceUnreachable(UserError):
    """pip-audit could not read the vulnerability data: no network route, a proxy, a mirror without it."""


@dataclass(frozen=True)
class Vulnerability:
    package: str
    version: str
    id: str
    aliases: tuple[str, ...] = ()
    fix_versions: tuple[str, ...] = ()

    def line(self) -> str:
        aliases = f" ({', '.join(self.aliases)})" if self.aliases else ""
        fix = f"fixed in {', '.join(self.fix_versions)}" if self.fix_versions else "no fixed version yet"
        return f"  {self.package} {self.version}: {self.id}{aliases}, {fix}"


@dataclass
class LockAudit:
    lock: Path
    audited: list[str] = field(default_factory=list)  # name==version
    skipped: dict[str, str] = field(default_factory=dict)  # name -> pip-audit's reason
    vulnerabilities: list[Vulnerability] = field(default_factory=list)

    def lines(self) -> list[str]:
        packages, found = len(self.audited), len(self.vulnerabilities)
        head = (f"{self.lock.name}: {packages} package{'' if packages == 1 else 's'} audited, "
                f"{found or 'no'} known vulnerabilit{'y' if found == 1 else 'ies'}")
        if self.skipped:
            head += f"; not audited: {', '.join(sorted(self.skipped))}"
        return [head, *(v.line() for v in self.vulnerabilities)]


def pip_audit_command(lock: Path, output: Path, service: str = "pypi", osv_url: str | None = None,
                      cache_dir: Path | None = None, timeout: float = 15) -> list[str]:
    """The lock is hashed and complete: --disable-pip audits exactly its pins (pip resolves and installs nothing)."""
    command = [sys.executable, "-m", "pip_audit", "--requirement", str(lock), "--disable-pip", "--format", "json",
               "--output", str(output), "--progress-spinner", "off", "--vulnerability-service", service,
               "--timeout", f"{timeout:g}"]
    if osv_url:
        command += ["--osv-url", osv_url]
    if cache_dir:
        command += ["--cache-dir", str(cache_dir)]
    return command


def parse_pip_audit(lock: Path, report: dict) -> LockAudit:
    """pip-audit's JSON report: {"dependencies": [{"name", "version", "vulns": [...]} or {"name", "skip_reason"}]}."""
    audit = LockAudit(lock)
    for dep in report.get("dependencies", []):
        if "skip_reason" in dep:
            audit.skipped[dep["name"]] = dep["skip_reason"]
            continue
        audit.audited.append(f"{dep['name']}=={dep['version']}")
        audit.vulnerabilities += [Vulnerability(dep["name"], dep["version"], v["id"], tuple(v.get("aliases", [])),
                                                tuple(v.get("fix_versions", []))) for v in dep.get("vulns", [])]
    return audit


def audit_lock(lock: Path, service: str = "pypi", osv_url: str | None = None, cache_dir: Path | None = None,
               timeout: float = 15, env: dict[str, str] | None = None) -> LockAudit:
    """Run pip-audit on one lock; raise ServiceUnreachable when it could not read the vulnerability data."""
    try:
        import pip_audit  # noqa: F401  (run as a module below: only its presence is checked here)
    except ImportError:
        raise UserError("pip-audit is not installed: `make install` (requirements/dev.txt pins it)") from None
    if not lock.is_file():
        raise UserError(f"no lock file {lock}: `make lock` writes requirements/lock/")
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "report.json"
        result = subprocess.run(pip_audit_command(lock, output, service, osv_url, cache_dir, timeout),
                                capture_output=True, text=True, env=env, timeout=600)
        report = json.loads(output.read_text()) if output.is_file() and output.stat().st_size else None
    if report is None:  # pip-audit stopped before it wrote a report (it prints a traceback)
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else f"exit {result.returncode}, no output"
        if UNREACHABLE.search(result.stderr):
            raise ServiceUnreachable(f"pip-audit cannot reach the vulnerability service ({service}): {last[:300]}")
        raise UserError(f"pip-audit failed on {lock.name} (exit {result.returncode}): {last[:300]}")
    return checked(parse_pip_audit(lock, report), service)


def checked(audit: LockAudit, service: str) -> LockAudit:
    """Refuse a report that audited nothing: pip-audit calls that "No known vulnerabilities found"."""
    if audit.skipped and not audit.audited:
        reason = next(iter(audit.skipped.values()))
        raise ServiceUnreachable(f"pip-audit could audit none of the {len(audit.skipped)} packages of "
                                 f"{audit.lock.name} against {service} (e.g. {reason}): no vulnerability data is "
                                 "reachable from here (an index mirror without PyPI's per-release JSON, or no route)")
    return audit


# ---- Java libraries bundled in a jar ------------------------------------------------------------------------


@dataclass(frozen=True)
class JarLibrary:
    group: str
    artifact: str
    version: str
    source: str  # the jar entry that records the version


class _CaseKeepingParser(configparser.ConfigParser):
    def optionxform(self, optionstr: str) -> str:
        return optionstr  # keep the keys' case


def _properties(text: str) -> dict[str, str]:
    parser = _CaseKeepingParser(interpolation=None, delimiters=("=", ":"))
    parser.read_string("[p]\n" + text)
    return dict(parser["p"])


NESTED_JAR = re.compile(r"(?:.*/)?(?P<artifact>[A-Za-z0-9_.-]+?)-(?P<version>\d[\w.+-]*)\.jar")
DECLARED = re.compile(r"\s(?P<group>[\w.-]+):(?P<artifact>[\w.-]+):(?:jar|bundle):(?P<version>[\w.+-]+)")


def bundled_libraries(jar: Path) -> tuple[list[JarLibrary], list[str]]:
    """The libraries a (fat) jar bundles, with versions, and the Java packages of its classes that no version
    record covers.

    Read from: META-INF/maven/<group>/<artifact>/pom.properties (Maven's shade and assembly plugins keep them);
    META-INF/<group>.versions.properties (netty writes one per artifact: `<artifact>.version=4.1.91.Final`);
    nested jars named <artifact>-<version>.jar (Spring Boot style); and META-INF/DEPENDENCIES (the versions a
    bundled library declares it was built with), kept only where classes of that group are in the jar.
    A fat jar made by merging jars can hold one entry name many times: every copy is read."""
    found: set[JarLibrary] = set()
    declared: set[JarLibrary] = set()
    with zipfile.ZipFile(jar) as z:
        infos = z.infolist()
        classes = [i.filename for i in infos
                   if i.filename.endswith(".class") and not i.filename.startswith("META-INF/")]
        for info in infos:
            name = info.filename
            if name.startswith("META-INF/maven/") and name.endswith("/pom.properties"):
                props = _properties(z.read(info).decode("utf-8", "replace"))
                if {"groupId", "artifactId", "version"} <= props.keys():
                    found.add(JarLibrary(props["groupId"], props["artifactId"], props["version"], name))
            elif re.fullmatch(r"META-INF/[\w.-]+\.versions\.properties", name):
                group = name.removeprefix("META-INF/").removesuffix(".versions.properties")
                for key, value in _properties(z.read(info).decode("utf-8", "replace")).items():
                    if key.endswith(".version"):
                        found.add(JarLibrary(group, key.removesuffix(".version"), value, name))
            elif (match := NESTED_JAR.fullmatch(name)) and not name.endswith("/"):
                found.add(JarLibrary("", match["artifact"], match["version"], name))
            elif name.endswith("DEPENDENCIES") and name.startswith("META-INF/"):
                for match in DECLARED.finditer(z.read(info).decode("utf-8", "replace")):
                    declared.add(JarLibrary(match["group"], match["artifact"], match["version"], name))

    packages = {c.rpartition("/")[0] for c in classes}

    def bundled(lib: JarLibrary) -> bool:
        """Whether the jar holds the declared artifact's classes: its own package (commons-io -> the group's
        io/ package), or for an api/core artifact (log4j-api, slf4j-api) classes right in the group's package."""
        group = lib.group.replace(".", "/")
        token = lib.artifact.rsplit("-", 1)[-1]
        if token not in lib.group.split(".") and token not in GENERIC_ARTIFACTS:
            return any(p == f"{group}/{token}" or p.startswith(f"{group}/{token}/") for p in packages)
        return group in packages

    versioned = {(lib.group, lib.artifact) for lib in found}
    found |= {lib for lib in declared if bundled(lib) and (lib.group, lib.artifact) not in versioned}
    groups = {lib.group.replace(".", "/") + "/" for lib in found if lib.group}
    unversioned = sorted({_package(c, packages).replace("/", ".") for c in classes if "/" in c
                          and not any(c.startswith(g) for g in groups)})
    return sorted(found, key=lambda lib: (lib.group, lib.artifact, lib.version)), unversioned


GENERIC_ARTIFACTS = {"api", "core", "impl", "all", "common", "lib", "java"}


def _package(class_file: str, packages: set[str]) -> str:
    """A library's package for a class: its first three parts (com/google/gson), or four where the third holds
    no classes itself (org/apache/commons/io, org/apache/commons/cli)."""
    parts = class_file.split("/")[:-1]
    return "/".join(parts[:3] if "/".join(parts[:3]) in packages else parts[:4])


def library_lines(libraries: list[JarLibrary], unversioned: list[str]) -> list[str]:
    """One line per group, version and source (netty's 30 artifacts at one version are one line)."""
    grouped: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for lib in libraries:
        grouped[(lib.group, lib.version, lib.source)].append(lib.artifact)
    lines = []
    for (group, version, source), artifacts in sorted(grouped.items()):
        if len(artifacts) == 1:
            lines.append(f"  {group + ':' if group else ''}{artifacts[0]} {version}  ({source})")
        else:
            lines.append(f"  {group} {version}: {len(artifacts)} artifacts ({', '.join(sorted(artifacts))}; "
                         f"{source})")
    if unversioned:
        lines.append(f"  no version recorded in the jar: {', '.join(unversioned)}")
    return lines


def installed_jars(distribution: str) -> tuple[str, list[Path]]:
    """The version of an installed Python distribution and the jars it ships."""
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise UserError(f"{distribution} is not installed here: `make install` installs it") from None
    jars = [Path(str(dist.locate_file(f))) for f in dist.files or [] if str(f).endswith(".jar")]
    return dist.version, sorted(jars)


def locked_version(lock: Path, package: str) -> str | None:
    match = re.search(rf"^{re.escape(package)}==(\S+)", lock.read_text(), re.MULTILINE | re.IGNORECASE)
    return match[1] if match else None
