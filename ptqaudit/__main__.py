"""`python -m ptqaudit`: the same command line as the `ptqaudit` script."""

from .cli import main

main()
