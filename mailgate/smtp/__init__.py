"""SMTP and LMTP in: the aiosmtpd protocol on the main loop (`server`) and the hooks that hand each
recipient and each DATA to admission and turn its decision into an SMTP reply (`handler`)."""
