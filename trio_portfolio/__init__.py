"""trio-portfolio: real-time portfolio analysis over WebSockets, on Trio and Redis."""

__version__ = "0.1.0"
