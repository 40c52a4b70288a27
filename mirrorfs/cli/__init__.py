"""The `mirrorfs` command: parsing, and what a person sees.

    main.py        the subcommands; every Error becomes one line on stderr and an exit code
    parser.py      the option groups the subcommands share, and the table of subcommands
    named.py       commands that take a disk by name (`start NAME`, `status NAME`, ...)
    host.py        the host's commands: `list`/`top`, `budget`, `rate`, `metrics`
    display.py     sizes, a progress bar, a one-screen status
"""
