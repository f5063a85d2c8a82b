"""Reliability and security harness: `python -m benchmarks.reliability [--quick] [--output DIR]`.

crash.py (SIGKILL the loader, resume, check the store), faults.py (serving fault injection),
hostile.py (schemathesis + hypothesis + a list of nasty requests), load.py (bounded overload),
security.py (API keys, dangerous endpoints, index escapes, secrets, TLS), report.py (Markdown).
"""
