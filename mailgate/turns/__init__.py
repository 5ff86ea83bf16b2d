"""Turns: from a committed message to a finished Handinger turn. `scheduler` decides what runs when,
`steps` does one state's work and says what happened, `turn_input` writes what the worker receives,
`spool` keeps its files on disk until they are uploaded."""
