"""A local Handinger-compatible API for trying mailgate without an account, and for tests.

It serves the subset mailgate uses (POST/GET/DELETE /api/tasks, the turns and workers endpoints, and
the agent's output files) with the real wire shapes, limits and errors, backed by a deterministic echo
agent. `[sandbox:...]` directives in a message and `state.faults` provoke failures; see docs/sandbox.md.

```python
async with run_sandbox(SandboxOptions(api_key="k")) as sb:
    ...  # talk to sb.url; inspect sb.state.requests, sb.state.turns_of(task_id)
```

`long_answer` and `served_file_bytes` give the exact text and bytes of the `answer-bytes` and
`file-bytes` switches, for tests that compare what arrived.
"""

from mailgate.sandbox._app import create_app
from mailgate.sandbox._body import MAX_FILE_SIZE, MAX_FILES, MAX_TOTAL_SIZE
from mailgate.sandbox._bulk import long_answer, served_file_bytes
from mailgate.sandbox._server import RunningSandbox, run_sandbox, serve_sandbox
from mailgate.sandbox._state import (
    Fault,
    FaultQueue,
    RecordedFile,
    RecordedRequest,
    SandboxOptions,
    SandboxState,
    SandboxTask,
    SandboxTurn,
)

__all__ = [
    "MAX_FILES",
    "MAX_FILE_SIZE",
    "MAX_TOTAL_SIZE",
    "Fault",
    "FaultQueue",
    "RecordedFile",
    "RecordedRequest",
    "RunningSandbox",
    "SandboxOptions",
    "SandboxState",
    "SandboxTask",
    "SandboxTurn",
    "create_app",
    "long_answer",
    "run_sandbox",
    "serve_sandbox",
    "served_file_bytes",
]
