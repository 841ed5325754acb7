"""A file writer as a process of its own, following a plan: the torture suite's slow cameras and copy tools.

The hot folder asks the kernel whether some process still holds a file open
for writing, so a writer must be a real process holding a real file
descriptor, not a thread of the test. Standard library only, run by path
(``python tests/torture/writer.py PLAN.json``), so it starts in a few
milliseconds.

The plan is a JSON object::

    {"target": "/in/part.png",           # where the steps write (str; lone surrogates stand for undecodable bytes)
     "versions": ["/stage/v0", ...],     # the complete contents the steps copy from
     "steps": [["open", "w"],            # O_WRONLY|O_CREAT|O_TRUNC ("w") or O_WRONLY|O_CREAT|O_APPEND ("a")
               ["write", 0, 0, 512],     # version 0, bytes 0..512
               ["sleep", 1.5],
               ["wait", "/scratch/go", 60],  # until this file exists (the test creates it), at most 60 s
               ["close"],
               ["rename", "/in/x.png"]]} # target -> this name (the target becomes the new name)

Each step is done in order; the process exits 0 once all are done, and
prints nothing unless a step fails.
"""

import json
import os
import sys
import time


def main(plan_path: str) -> int:
    with open(plan_path, encoding="utf-8") as handle:
        plan = json.load(handle)
    target = os.fsencode(plan["target"])
    versions = []
    for source in plan["versions"]:
        with open(os.fsencode(source), "rb") as handle:
            versions.append(handle.read())
    fd = -1
    for step in plan["steps"]:
        kind = step[0]
        if kind == "open":
            flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if step[1] == "w" else os.O_APPEND)
            fd = os.open(target, flags, 0o644)
        elif kind == "write":
            view = memoryview(versions[step[1]])[step[2]:step[3]]
            while view:
                view = view[os.write(fd, view):]
        elif kind == "sleep":
            time.sleep(step[1])
        elif kind == "wait":
            deadline = time.monotonic() + step[2]
            while not os.path.exists(os.fsencode(step[1])) and time.monotonic() < deadline:
                time.sleep(0.01)
        elif kind == "close":
            os.close(fd)
            fd = -1
        elif kind == "rename":
            new = os.fsencode(step[1])
            os.rename(target, new)
            target = new
        else:
            raise ValueError(f"unknown writer step {step!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
