"""Replies: the mail that goes back in the thread. `compose` decides who a reply goes to and how it
threads and makes its outbox row; `render` writes it (jinja2 templates, sanitised Markdown); `output_files`
fetches what the worker produced for it."""
