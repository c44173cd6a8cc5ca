"""Hidden-test harness of the code family: standard library only, run inside a sandbox.

Written into the sandbox work directory as ``cf_harness.py`` and run as
``python3 -I -S cf_harness.py`` with a one-line nonce on stdin. It reads ``cf_task.json``
(``{"params": [...], "tests": [[args, expected], ...]}``) and ``cf_body.txt`` (the policy's one
line, bytes, decoded as UTF-8 with replacement), builds::

    def f(<params>):
        <body>

(a body that is a bare expression gets ``return`` in front), runs every test with the solution's
stdout captured, and prints **one** machine-readable line to the original stdout:
``CFRESULT <nonce> {"passed": k, "total": n, "failures": [...], "error": "..."}``. Each failure
is ``{"call": "f(1, 2)", "expected": "2", "got": "1"}`` (``got`` may be an exception name).

The solution's own output goes to a buffer, and file descriptor 1 is pointed at /dev/null while
it runs, so a body that prints cannot forge the result line by accident; the nonce (read before
the solution is compiled) makes deliberate forging require introspecting the harness. This is a
fault boundary for a small policy, not a defence against adversarial code (use the docker
backend and review rewards of strong models).

:func:`run_tests` is importable (the family computes warm-up feedback in-process with it, on its
own trusted reference bodies only).
"""

import ast
import builtins
import copy
import io
import json
import os
import sys

MAX_REPR = 40


def _short(value):
    try:
        text = repr(value)
    except BaseException:  # noqa: BLE001 - a hostile __repr__
        text = "<unprintable>"
    return text if len(text) <= MAX_REPR else text[: MAX_REPR - 3] + "..."


def build_source(params, body):
    """The function definition for a one-line ``body`` (``return`` added to a bare expression)."""
    body = body.split("\n", 1)[0].strip()
    try:
        tree = ast.parse(body, mode="eval")
        if not body.startswith(("yield", "await", "lambda")) and tree is not None:
            body = "return " + body
    except BaseException:  # noqa: BLE001 - a statement, or not Python at all
        pass
    return "def f(%s):\n    %s\n" % (", ".join(params), body or "pass")


def run_tests(params, body, tests):
    """Compile ``body`` as ``f(params)`` and run ``tests``; the summary dict (see module docstring)."""
    total = len(tests)
    summary = {"passed": 0, "total": total, "failures": [], "error": ""}
    try:
        code = compile(build_source(params, body), "<solution>", "exec")
        namespace = {"__builtins__": builtins, "__name__": "solution"}
        exec(code, namespace)
        fn = namespace["f"]
    except BaseException as exc:  # noqa: BLE001 - SyntaxError, or anything the definition raises
        summary["error"] = "%s: %s" % (type(exc).__name__, _short(str(exc)))
        return summary
    for args, expected in tests:
        call = "f(%s)" % ", ".join(_short(a) for a in args)
        try:
            got = fn(*copy.deepcopy(args))
            ok = type(got) is type(expected) and got == expected or (
                isinstance(got, (list, tuple)) and isinstance(expected, list) and list(got) == expected
            )
            got_text = _short(got)
        except BaseException as exc:  # noqa: BLE001 - RecursionError, SystemExit, ...
            ok, got_text = False, type(exc).__name__
        if ok is True:
            summary["passed"] += 1
        else:
            summary["failures"].append({"call": call, "expected": _short(expected), "got": got_text})
    return summary


def main():
    nonce = sys.stdin.readline().strip()
    real_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    sys.stdout = io.StringIO()
    try:
        with open("cf_task.json", "rb") as f:
            task = json.loads(f.read().decode("utf-8"))
        with open("cf_body.txt", "rb") as f:
            body = f.read().decode("utf-8", "replace")
        sys.setrecursionlimit(200)
        summary = run_tests(task["params"], body, task["tests"])
    except BaseException as exc:  # noqa: BLE001
        summary = {"passed": 0, "total": 0, "failures": [], "error": "harness: %s" % type(exc).__name__}
    line = "CFRESULT %s %s\n" % (nonce, json.dumps(summary))
    os.write(real_out, line.encode("utf-8", "replace"))
    os._exit(0)  # skip atexit handlers the solution may have registered


if __name__ == "__main__":
    main()
