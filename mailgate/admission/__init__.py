"""Admission: who may write, which thread a message continues, what must never be answered, and the
durable commit behind every 250 (`admit`). `authn`, `policy` and `threads` are pure; `admit` wires them
to the store."""
