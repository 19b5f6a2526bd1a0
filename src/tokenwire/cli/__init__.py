"""Command line: ``tokenwire serve``, ``tokenwire chat``, ``tokenwire bench``."""
