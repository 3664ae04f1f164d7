"""Run a command; print its peak resident set size (MiB) as the last stderr line."""

import resource
import subprocess
import sys

rc = subprocess.run(sys.argv[1:]).returncode
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"peak_rss_mib {peak_kib / 1024:.1f}", file=sys.stderr)
sys.exit(rc)
