"""Delivery: the outbox loop (`outbox`) hands each committed reply to the relay or the local Maildir
(`transports`), retrying until the horizon."""
