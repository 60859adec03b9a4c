"""Exit codes of the host scripts (scripts/*.py and the local search); scripts and CI can rely on them.

    0  done (or, with --no-wait, the request was accepted)
    1  the job or endpoint ended Failed or Stopped (the reason is printed)
    2  bad arguments or input: nothing was sent
    3  AWS refused or is unreachable: credentials, region, role, permissions, a missing resource
    4  --timeout passed while waiting; the job or endpoint carries on in AWS
  130  interrupted (Ctrl-C) while waiting; the job or endpoint carries on in AWS
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AWS, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES_HELP = """exit status: 0 done (with --no-wait: accepted); 1 the job or endpoint ended Failed/Stopped
or rolled back; 2 bad arguments or input, nothing sent; 3 AWS refused or unreachable (credentials, region,
role, permissions, missing resource); 4 --timeout passed (it carries on in AWS); 130 interrupted."""


class JobFailed(Exception):
    """The job, endpoint or search ended in a failed state (exit 1); the message holds the reason."""
