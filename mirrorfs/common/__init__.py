"""What both processes share: standard library only, so nbdkit's embedded interpreter imports it too.

    jsonlines.py   the JSON-lines protocol of every control socket (server and client)
    sizes.py       sizes as an operator writes and reads them
    phases.py      every phase a served disk can be in, named once
    pacing.py      the one rate limiter of every copy, its rate changeable while it runs
"""
