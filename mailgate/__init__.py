"""mailgate: an email-triggered task gateway for Handinger workers."""

__version__ = "0.1.0"
