"""Reading mail, pure: the header toolkit (`headers`), the MIME body (`parse`, `bodies`), and the new
text of a reply (`trimming`). No I/O; nothing here raises on malformed mail."""
