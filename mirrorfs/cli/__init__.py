"""The `mirrorfs` command: parsing, and what a person sees.

    main.py        the subcommands; every Error becomes one line on stderr and an exit code
    display.py     sizes, a progress bar, a one-screen status
"""
