"""`python -m expunge` runs the command line."""

from .cli import main

main()
